"""The compositional agent's acting policy: options chosen by the controller at decision points.

A ``RolloutPolicy`` for the shared collector. Every env step it

1. adds the last reward to the active segment and the step's outcome (the family's:
   CompoGrid object events, Meta-World displacements; ``compositional.family``);
2. ends the active skill if its termination fires (``OptionLibrary.beta``), it has run
   ``t_max`` steps, the task's progress advanced (``interrupt="progress"``), or an episode
   ended (composer ``soft``: every step);
3. records each finished segment in the trial's belief tables ("paid at this sub-task
   position" / "tried here without pay", ``belief_evidence``) and for the skill graph
   (``seg_ok``; ``seg_label``: it ended as its skill ends, the state-conditioned graph's
   data);
4. at decisions only, steps the LSTM controller (``compositional.controller``) and lets the
   pointer composer (``compositional.composer``) choose the next skill;
5. acts with the active skill alone, at ``skill_temperature`` (``soft``: with the composer's
   mixture of all skills).

With ``library_finetune`` on or ``discovery`` the rollout also carries what the skills' own
updates need: the acting skill's log-probability and value (``StepOutput.logp`` / ``value``),
segment starts and, for ``discovery``, the extras ``primitives.option_training.ChainPolicy``
records (``seg_len``, ``term``, ``beta_on``, ``beta_logp``, ``start_state``), so phase 2's
segments train the library by the discovery objective (``Discovery.learn``).

Its memory (a tuple of tensors, so the collector can checkpoint it) holds the controller
state, the active segment and the trial's belief tables, and is reset between trials. What a
decision needs for the PPO update (its input, choice, log-probability, value, prior) goes into
``StepOutput.extras``, as do ``skill``/``alpha``/``decision`` for ``compo trace``.
"""

from __future__ import annotations

import torch

from compositional.controller import decision_features
from envs.grid_events import object_state
from primitives.outcome import STATE_DIM
from rl.collect import Prev, StepOutput

# memory layout (a plain tuple: the collector clones and checkpoints it element-wise)
H, C, SKILL, SEG_LEN, SEG_REW, SEG_EV, SEG_POS, LAST_OBS, PAID, TRIED = range(10)
BIAS, ACC, EP_RET, EP_MEAN, EP_CNT, PREV = range(10, 16)
START = 16  # library_finetune="discovery" only: object state at the active segment's start


class SkillLevelPolicy:
    """Acts for ``agent`` (a ``CompositionalAgent``: library, controller, composer, graph)."""

    def __init__(self, agent, generator: torch.Generator) -> None:
        self.a = agent
        self.gen = generator
        self.K = agent.library.num_skills
        self.soft = agent.cfg.composer == "soft"
        # library fine-tuning: the acting skill's log-probability and value go in the rollout
        self.finetune = agent.cfg.library_finetune in ("on", "discovery")
        # + ChainPolicy's extras (discovery's objective continued in phase 2)
        self.discover = self.finetune and agent.cfg.library_finetune == "discovery"
        self.discover = self.discover and agent.cfg.primitives == "discovered"
        self.fam = agent.family

    # -- memory ---------------------------------------------------------------------------------
    def initial_memory(self, n: int):
        K, hid, fam = self.K, self.a.controller.hidden, self.fam
        z = torch.zeros
        mem = (
            z(n, hid), z(n, hid), torch.full((n,), -1, dtype=torch.long),
            z(n, dtype=torch.long), z(n), z(n, fam.outcome_dim), z(n, dtype=torch.long),
            z(n, self.a.obs_dim), z(n, fam.max_len, K), z(n, fam.max_len, K),
            z(n, K), z(n, K), z(n), z(n), z(n), torch.full((n,), -1, dtype=torch.long),
        )  # fmt: skip
        return (*mem, z(n, STATE_DIM)) if self.discover else mem

    def reset_memory(self, memory, mask: torch.Tensor):
        fresh = self.initial_memory(int(mask.sum()))
        out = []
        for m, f in zip(memory, fresh):
            m = m.clone()
            m[mask] = f
            out.append(m)
        return tuple(out)

    def bootstrap_value(self, obs, memory, prev) -> torch.Tensor:
        return torch.zeros(obs.shape[0])  # decision-level values live in the extras

    def _evidence(self, by_beta, timeout, boundary) -> torch.Tensor:
        """(B,) which ending segments may count as "tried here without pay"
        (``belief_evidence``): every one ('any', and every one-step segment of ``soft``), or
        those that ended as their skill ends — its termination, or its fixed duration on
        Meta-World — not cut by ``t_max`` or the episode's end."""
        if self.soft or self.a.cfg.belief_evidence == "any":
            return torch.ones_like(by_beta)
        if self.a.library.termination == "duration":
            return timeout & ~boundary
        return by_beta

    # -- one env step ---------------------------------------------------------------------------
    def step(self, obs: torch.Tensor, memory, prev: Prev) -> StepOutput:
        a, K, B = self.a, self.K, obs.shape[0]
        cfg = a.cfg
        m = list(memory)
        skill = m[SKILL]
        boundary = prev.done > 0
        active = skill >= 0
        r = prev.reward
        m[SEG_REW] = m[SEG_REW] + r * active
        m[EP_RET] = m[EP_RET] + r
        # outcome of the last transition (an episode boundary hides the final one)
        cont = active & ~boundary
        comp, ev, feas = self.fam.step_outcome(m[LAST_OBS], obs)
        m[SEG_EV] = self.fam.accumulate(m[SEG_EV], ev, cont)
        # 1. which active skills end here
        ended = boundary & active
        by_beta = torch.zeros(B, dtype=torch.bool)
        timeout = torch.zeros(B, dtype=torch.bool)
        beta_on, beta_logp = torch.zeros(B, dtype=torch.bool), torch.zeros(B)
        if self.soft:
            ended = active.clone()
        else:
            timeout = cont & (m[SEG_LEN] >= cfg.t_max)
            check = cont & ~timeout
            lib = a.library
            if lib.termination == "event":  # exact: own primitive completed or infeasible
                own = lib.event_of[skill.clamp(min=0)]
                rows = torch.arange(B)
                by_beta = check & (comp[rows, own] | ~feas[rows, own])
            elif lib.termination == "learned" and check.any():
                beta = lib.beta(m[LAST_OBS][check], obs[check], skill[check], ev[check])
                fire = torch.rand(int(check.sum()), generator=self.gen) < beta
                by_beta[check] = fire
                if self.discover:  # the decision's log-probability, on event steps only
                    on = ev[check].any(-1)
                    bc = beta.clamp(1e-6, 1 - 1e-6)
                    lp = torch.where(fire, bc.log(), (1 - bc).log())
                    beta_on[check] = on
                    beta_logp[check] = torch.where(on, lp, torch.zeros_like(lp))
            ended = ended | timeout | by_beta
            if cfg.interrupt == "progress":  # a sub-task was completed on this step
                ended |= cont & (self.fam.progress(obs) > self.fam.progress(m[LAST_OBS]))
        # 2. finished segments: the trial's belief tables and the graph's data
        extras = {
            "seg_end": ended & ~boundary,
            "seg_skill": skill.clone(),
            "seg_prev": m[EP_CNT].new_full((B,), -1, dtype=torch.long),
            "seg_ok": torch.zeros(B, dtype=torch.bool),
            # it ended as its skill ends (termination or t_max): the state graph's data
            "seg_label": ended & ~boundary & (by_beta | timeout),
        }
        if ended.any():
            idx = ended.nonzero().squeeze(-1)
            pos, k = m[SEG_POS][idx], skill[idx]
            paid = (m[SEG_REW][idx] > 0).float()
            # evidence against the skill here: it ran to its own end and nothing paid
            tried = (1 - paid) * self._evidence(by_beta, timeout, boundary)[idx].float()
            m[PAID] = m[PAID].clone()
            m[TRIED] = m[TRIED].clone()
            m[PAID][idx, pos, k] = torch.maximum(m[PAID][idx, pos, k], paid)
            m[TRIED][idx, pos, k] = torch.maximum(m[TRIED][idx, pos, k], tried)
            extras["seg_prev"][idx] = m[PREV][idx]
            lib = a.library
            if lib.termination == "event":  # reached: its own primitive completed on the way
                extras["seg_ok"][idx] = m[SEG_EV][idx, lib.event_of[k]] > 0
            elif lib.termination == "duration":  # it moved the object
                extras["seg_ok"][idx] = self.fam.moved(m[SEG_EV][idx])
            else:  # discovered: it produced its main outcome (not measured yet: it terminated)
                main = lib.outcome_of[k]
                reached = m[SEG_EV][idx, main.clamp(min=0)] > 0
                extras["seg_ok"][idx] = torch.where(main >= 0, reached, by_beta[idx])
        # inner loop (ablation): one REINFORCE step on a per-trial skill bias per episode
        if cfg.inner_loop == "on":
            # the step's gradient norm for rl.diagnostics (NaN: no inner step at this step)
            extras["inner_grad_norm"] = torch.full((B,), float("nan"))
        if cfg.inner_loop == "on" and boundary.any():
            i = boundary.nonzero().squeeze(-1)
            base = torch.where(m[EP_CNT][i] > 0, m[EP_MEAN][i], torch.full_like(m[EP_MEAN][i], 0.5))
            m[BIAS] = m[BIAS].clone()
            grad = (m[EP_RET][i] - base)[:, None] * m[ACC][i]
            m[BIAS][i] += cfg.inner_lr * grad
            stepped = m[ACC][i].abs().sum(-1) > 0  # an episode ended (not a fresh trial)
            extras["inner_grad_norm"][i[stepped]] = grad[stepped].norm(dim=-1)
            m[EP_MEAN] = m[EP_MEAN].clone()
            m[EP_MEAN][i] = (m[EP_MEAN][i] * m[EP_CNT][i] + m[EP_RET][i]) / (m[EP_CNT][i] + 1)
            m[EP_CNT] = m[EP_CNT] + boundary.float()
            m[ACC] = torch.where(boundary[:, None], torch.zeros_like(m[ACC]), m[ACC])
        m[EP_RET] = torch.where(boundary, torch.zeros_like(m[EP_RET]), m[EP_RET])

        # 3. decisions
        decide = ended | ~active
        feats = torch.zeros(B, a.feature_dim)
        dec_logp, dec_value = torch.zeros(B), torch.zeros(B)
        alpha = torch.zeros(B, K)
        bias_used = torch.zeros(B, K)
        prior = torch.zeros(B, K)  # the graph's log-prior the decision was taken with
        extras["dec_prev"] = torch.full((B,), -1, dtype=torch.long)
        if decide.any():
            d = decide.nonzero().squeeze(-1)
            old = skill[d]
            # the graph's row: the skill that just ended, none at an episode start
            row = torch.where(boundary[d], torch.full_like(old, -1), old)
            pos = self.fam.progress(obs[d]).clamp(max=self.fam.max_len - 1)
            token = self.fam.token(obs[d])
            x = decision_features(
                obs[d], old, m[SEG_EV][d], self.fam.reward_feature(m[SEG_REW][d], m[SEG_LEN][d]),
                m[SEG_LEN][d].float() / cfg.t_max,
                boundary[d], m[PAID][d, pos], m[TRIED][d, pos], K, token,
            )  # fmt: skip
            h, c = a.controller(x, m[H][d], m[C][d])
            state = self.fam.task_free(obs[d]) if a.graph.mode == "state" else None
            prior[d] = a.graph.log_prior(row, state)
            logits = a.composer.logits(
                h, token, prior[d] + m[BIAS][d], m[PAID][d, pos], m[TRIED][d, pos]
            )
            m[H], m[C] = m[H].clone(), m[C].clone()
            m[H][d], m[C][d] = h, c
            probs = torch.softmax(logits, -1)
            if cfg.composer == "uniform":
                new = torch.randint(K, (len(d),), generator=self.gen)
            else:
                new = torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)
            feats[d] = x
            dec_logp[d] = torch.log_softmax(logits, -1).gather(1, new[:, None]).squeeze(-1)
            dec_value[d] = a.controller.value(h)
            alpha[d] = probs
            bias_used[d] = m[BIAS][d]
            m[ACC] = m[ACC].clone()
            m[ACC][d] += torch.nn.functional.one_hot(new, K).float() - probs
            skill = skill.clone()
            skill[d] = new
            m[SKILL] = skill
            m[PREV] = m[PREV].clone()
            m[PREV][d] = row
            extras["dec_prev"][d] = row
            m[SEG_LEN] = torch.where(decide, torch.zeros_like(m[SEG_LEN]), m[SEG_LEN])
            m[SEG_REW] = torch.where(decide, torch.zeros_like(m[SEG_REW]), m[SEG_REW])
            m[SEG_EV] = torch.where(decide[:, None], torch.zeros_like(m[SEG_EV]), m[SEG_EV])
            m[SEG_POS] = m[SEG_POS].clone()
            m[SEG_POS][d] = pos
            if self.discover:
                m[START] = m[START].clone()
                m[START][d] = object_state(obs[d])

        # 4. act
        if self.soft:
            pi = torch.softmax(a.library.all_logits(obs), -1)  # (B, K, A)
            mix = (alpha[:, :, None] * pi).sum(1)
            action = torch.multinomial(mix, 1, generator=self.gen).squeeze(-1)
            extras["pi_a"] = pi[torch.arange(B), :, action]
            dec_logp = torch.log((alpha * extras["pi_a"]).sum(-1).clamp_min(1e-12))
            probs = mix
        elif a.library.continuous:  # a Gaussian skill (Meta-World)
            dist = a.library.dist(obs, skill)
            action = dist.sample()
            logp = dist.log_prob(action)
            extras["skill_entropy"] = dist.entropy()
        else:
            # Categorical(logits).sample() without the distribution object (same draw)
            logits = a.library.logits(obs, skill)
            T = float(cfg.skill_temperature)
            if T == 0:  # the skill's most probable action
                action = logits.argmax(-1)
                probs = torch.nn.functional.one_hot(action, logits.shape[-1]).to(logits.dtype)
            else:
                probs = torch.softmax(logits / T if T != 1 else logits, -1)
                action = torch.multinomial(probs, 1, True).squeeze(-1)
            logp = None
            if self.finetune:
                logp = probs.gather(1, action[:, None]).squeeze(-1).clamp_min(1e-12).log()
        if self.finetune and not self.soft:  # the skills' PPO data (agent._finetune_library)
            extras.update(
                seg_start=decide.clone(), beta_end=by_beta & ~boundary,
                skill_logp=logp, skill_value=a.library.value(obs, skill),
            )  # fmt: skip
        if "skill_entropy" not in extras:  # entropy of the acting distribution (rl.diagnostics)
            extras["skill_entropy"] = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        m[SEG_LEN] = m[SEG_LEN] + 1
        m[LAST_OBS] = obs
        if self.discover:  # as ChainPolicy records its chains (Discovery.learn reads them)
            extras.update(
                seg_len=m[SEG_LEN].clone(), term=by_beta.clone(), beta_on=beta_on,
                beta_logp=beta_logp, start_state=m[START].clone(),
            )  # fmt: skip
        extras.update(
            decision=decide, ctrl_in=feats, skill=skill.clone(), dec_logp=dec_logp,
            dec_value=dec_value, alpha=alpha, bias=bias_used, prior=prior,
        )  # fmt: skip
        zero = torch.zeros(B)
        if self.finetune and not self.soft:
            return StepOutput(
                action, extras.pop("skill_logp"), extras.pop("skill_value"), tuple(m), extras
            )
        return StepOutput(action, zero, zero, tuple(m), extras)

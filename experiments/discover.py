"""Outcome-based skill discovery on CompoGrid, and the skills x outcomes table (issue 13).

``python -m experiments.discover --out DIR [--steps 8000000] [--num-skills 19] [--seed 0]
[--start-skills N] [--bc-coef 1.0] [--bc-epochs 5] [--cut-reward -1.0] [--reward-floor F]
[--gamma 0.95] [--ent-coef 0.01] [--relabel assign|argmax] [--num-envs 128] [--num-steps 64]
[--states 16]``
trains ``primitives.outcome`` discovery (no task reward) and writes, in DIR:
``library.pt`` (plain state dict, ``rl.io.safe_torch_load``), ``log.jsonl`` (one line per
rollout), then ``table.md`` / ``table.json`` / ``table.png`` from ``primitives.outcome_eval``:
per skill and primitive how often the skill completes the primitive when started where it is
feasible, the best skill per primitive, the discriminator's accuracy on held-out segments.

``--evaluate CKPT`` only evaluates a saved discovery checkpoint, or the library discovered
inside a ``compositional`` run (its ``checkpoints/last.ckpt``, ``primitives: discovered``);
``--supervised STEPS``
trains the supervised library (one skill per primitive, event termination) for STEPS env
steps instead and evaluates it (the harness's check: its diagonal should be ~0.9+).
Single process; ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from primitives.option_training import (
    ChainPolicy,
    OptionTrainingConfig,
    feasible_draw,
    supervised_rewards,
    update_skills,
)
from primitives.options import OptionLibrary
from primitives.outcome import DiscoveryConfig
from primitives.outcome_eval import evaluate_library, plot_library
from primitives.outcome_training import discover, load_discovered, make_room
from rl.collect import Collector
from rl.io import (
    append_jsonl,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    safe_torch_load,
)


def train_supervised(steps: int, seed: int, log_path: Path) -> OptionLibrary:
    """The supervised library (K = 19, termination "event") on the room, as the lead
    engineer's measurement loop trains it (feasible draws, reward 1 on completion)."""
    torch.manual_seed(seed)
    cfg = OptionTrainingConfig()
    venv, sampler = make_room(64)
    obs_dim = venv.single_observation_space.shape[0]
    lib = OptionLibrary(obs_dim, 6, 19, termination="event", event_of=list(range(19)))
    gen = torch.Generator().manual_seed(seed)
    pol = ChainPolicy(lib, cfg.t_max, feasible_draw(lib, gen), gen)
    col = Collector(venv, pol, task_sampler=sampler, seed=seed)
    opt = torch.optim.Adam(lib.parameters(), lr=cfg.ppo.lr, eps=1e-5)
    t0 = time.perf_counter()
    while col.env_steps < steps:
        ro = col.collect(cfg.num_steps)
        r, term = supervised_rewards(lib, ro)
        st = update_skills(lib, ro, r, term, opt, cfg.ppo)
        row = {"env_steps": col.env_steps, "wall_s": time.perf_counter() - t0}
        row["completions_per_segment"] = float(r.sum() / ro.extras["seg_start"].sum())
        append_jsonl(log_path, {**row, **st})
    return lib


def discovery_state(ckpt: dict) -> dict:
    """A discovery checkpoint as ``load_discovered`` reads it, from either a discovery
    ``library.pt`` or a ``compositional`` agent's Lightning checkpoint (its ``library.*`` and
    ``discriminator.*`` weights)."""
    if "state_dict" not in ckpt:
        return ckpt
    sd = ckpt["state_dict"]
    part = {
        name: {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
        for name in ("library", "discriminator")
    }
    if not part["discriminator"] or not part["library"]:
        raise SystemExit(
            "--evaluate: this checkpoint holds no discovered library (allowed: a discovery "
            "library.pt, or a compositional run with primitives: discovered)"
        )
    lib = part["library"]
    if "log_std" in lib:  # Gaussian options: a Meta-World library
        raise SystemExit(
            "--evaluate: this checkpoint holds a Meta-World library (Gaussian options); "
            "allowed: a CompoGrid library (the skills x outcomes table is CompoGrid's)"
        )
    K = int(lib["event_of"].shape[0])
    # the run's own t_max: the skills are measured with the cut they were trained with
    t_max = int((ckpt.get("hyper_parameters") or {}).get("config", {}).get("t_max", 32))
    return {
        "config": {"num_skills": K, "hidden": int(lib["critic.0.weight"].shape[0]), "t_max": t_max},
        "obs_dim": int(lib["critic.0.weight"].shape[1]),
        "n_actions": int(lib["actor.weight"].shape[0]) // K,
        **part,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="run folder (must not exist or be empty)")
    ap.add_argument("--steps", type=int, default=8_000_000, help="discovery env-step budget")
    ap.add_argument("--num-skills", type=int, default=19)
    ap.add_argument("--hidden", type=int, default=128, help="library and discriminator width")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-skills", type=int, default=None, help="VALOR growth from N")
    ap.add_argument("--bc-coef", type=float, default=1.0)
    ap.add_argument(
        "--bc-epochs", type=int, default=5, help="imitation passes over each rollout's segments"
    )
    ap.add_argument("--cut-reward", type=float, default=-1.0)
    ap.add_argument("--reward-floor", type=float, default=None)
    ap.add_argument("--relabel", default="assign", help="assign or argmax")
    ap.add_argument("--gamma", type=float, default=0.95, help="skills' PPO discount")
    ap.add_argument("--ent-coef", type=float, default=0.01, help="skills' entropy bonus")
    ap.add_argument(
        "--update-epochs", type=int, default=8, help="skills' PPO epochs per rollout (ppo_epochs)"
    )
    ap.add_argument(
        "--disc-steps", type=int, default=8, help="discriminator minibatch steps per rollout"
    )
    ap.add_argument(
        "--draw", default="uniform", help="chains' skill draw: uniform or value (critic-guided)"
    )
    ap.add_argument("--draw-explore", type=float, default=0.25, help="uniform share of 'value'")
    ap.add_argument("--num-envs", type=int, default=128, help="parallel rooms")
    ap.add_argument("--num-steps", type=int, default=64, help="vector steps per rollout")
    ap.add_argument("--states", type=int, default=16, help="start states per primitive")
    ap.add_argument("--evaluate", default=None, help="only evaluate this discovery checkpoint")
    ap.add_argument("--supervised", type=int, default=None, help="train the supervised library")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and a.evaluate is None:
        raise SystemExit(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    cfg = None
    if a.supervised is None and a.evaluate is None:
        try:  # validated before anything is written: one line, exit 2
            cfg = DiscoveryConfig(
                num_skills=a.num_skills, total_env_steps=a.steps, seed=a.seed, hidden=a.hidden,
                start_skills=a.start_skills, bc_coef=a.bc_coef, bc_epochs=a.bc_epochs,
                cut_reward=a.cut_reward, reward_floor=a.reward_floor, relabel=a.relabel,
                disc_steps=a.disc_steps, ppo_epochs=a.update_epochs, draw=a.draw,
                draw_explore=a.draw_explore, num_envs=a.num_envs, num_steps=a.num_steps,
                ppo={"lr": 1e-3, "gamma": a.gamma, "ent_coef": a.ent_coef},
            )  # fmt: skip
        except (TypeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    disc, t_max = None, 32
    if a.supervised is not None:
        lib = train_supervised(a.supervised, a.seed, out / "log.jsonl")
        atomic_torch_save({"library": lib.state_dict()}, out / "library.pt")
    elif a.evaluate is not None:
        state = discovery_state(safe_torch_load(a.evaluate))
        lib, disc = load_discovered(state)
        t_max = int(state["config"].get("t_max", 32))
    else:

        def log(row: dict) -> None:
            append_jsonl(out / "log.jsonl", row)
            if len(row) and int(row["env_steps"]) % (50 * cfg.num_envs * cfg.num_steps) == 0:
                keys = ("env_steps", "wall_s", "disc_acc_unseen", "intrinsic_reward")
                print({k: round(float(row.get(k, float("nan"))), 3) for k in keys}, flush=True)

        lib, disc, _ = discover(cfg, log=log, checkpoint=out / "library.pt")
        t_max = cfg.t_max
    result = evaluate_library(lib, disc, n_states=a.states, seed=a.seed + 1, t_max=t_max)
    if a.evaluate is None and a.supervised is None:
        # keep the measured skill names in the checkpoint (``OptionLibrary.skill_names``)
        state = safe_torch_load(out / "library.pt")
        state["library"] = lib.state_dict()
        atomic_torch_save(state, out / "library.pt")
    atomic_write_json(out / "table.json", result["json"])
    atomic_write_text(out / "table.md", result["markdown"])
    plot_library(result["json"], out / "table.png")
    print(result["markdown"])


if __name__ == "__main__":
    main()

"""Scale-out on Lightning DDP (issue 14 item 5), on CPU with 2 gloo processes.

1. The update: 2 processes, each holding half of the envs, end with the parameters of one
   process holding all of them. Both are fed the same real CompoGrid rollouts (the sampling
   RNG makes the rollouts of a 2-process run differ from a 1-process run's, see
   ``Collector.shard``): a ``ReplayCollector`` serves rank r the columns ``[r n, (r+1) n)`` of
   each stored rollout, and the real PPO / RL² modules train on them through the real
   ``rl.train.fit`` (Lightning Trainer, DDPStrategy, ``manual_backward``). Parameters after 3
   iterations (48 minibatch steps of PPO, 24 of RL²) agree within ``ATOL``, while training
   moved them by far more; the logged losses agree too. The same for the meta-batch methods
   (MAML with its TRPO step, FOMAML, Reptile): 2 processes adapting 2 tasks each against 1
   process adapting all 4, replaying the pre- and post-update trials of 3 real 1-process
   meta-iterations; PEARL, 2 processes each running 2 of 4 trials and computing 2 of the 4
   tasks of every update's meta-batch; the compositional agent (3 iterations of outcome
   discovery, 3 of the controller with the library fine-tuned) and the DIAYN library, their
   rollouts recorded from a real 1-process run.
2. End to end through ``compo train --devices 2 --strategy ddp`` (PPO, MAML, PEARL, the
   compositional agent across its phase boundary): summed env steps, one checkpoint holding
   both ranks' collectors, a SIGKILLed run resumed under 2 processes ends bit-for-bit as the
   uninterrupted run, and resumed under 1 process it finishes the budget.
3. Bad layouts are one-line errors (exit 2, nothing written).

Run as a script (``python tests/test_ddp.py replay ...``) it is the training side of 1.:
Lightning's DDP launcher starts rank 1 by running the same command again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
COMPO = str(ROOT / ".venv" / "bin" / "compo")
PY = sys.executable
#: largest |difference| allowed between the 1- and 2-process parameters: the two differ only in
#: the order of float sums (each rank's mean loss, then DDP's all-reduce); 6e-8 was measured
#: for both methods after the 3 iterations (one float32 ulp of the larger weights)
ATOL = 1e-5
#: the same for MAML's TRPO step: its 10 conjugate-gradient iterations on Fisher-vector products
#: (double back-propagation through the adaptation, float32) amplify the summation-order
#: differences; measured 3.3e-5 after 3 iterations, against 0.049 of movement (FOMAML's Adam
#: step and Reptile's mean: 6e-8, within ``ATOL``)
ATOL_TRPO = 1e-4
ITERATIONS = 3
CONFIGS = {
    "ppo": {"num_envs": 4, "ppo": {"num_steps": 32}},
    "rl2": {
        "num_envs": 4,
        "rnn": "gru",
        "hidden": 16,
        "num_layers": 1,
        "head_hidden": 16,
        "episodes_per_trial": 2,
        "ppo": {"num_steps": 32, "num_minibatches": 2},
    },  # fmt: skip
    # the meta-batch of tasks spread over the ranks: the headline recipe (TRPO outer step,
    # second order), FOMAML's Adam step (DDP's all-reduce) and Reptile
    "maml": {"meta_batch_size": 4, "hidden": 16, "outer_optimizer": "trpo", "max_kl": 0.05},
    "fomaml": {"meta_batch_size": 4, "hidden": 16, "outer_lr": 0.01},
    "reptile": {"meta_batch_size": 4, "hidden": 16},
    # 4 trials and a meta-batch of 4 tasks per update spread over the ranks
    "pearl": {
        "num_envs": 4,
        "meta_batch": 4,
        "hidden": 16,
        "encoder_hidden": 16,
        "num_train_tasks": 8,
        "batch_size": 16,
        "context_batch": 8,
        "num_grad_steps": 10,
    },  # fmt: skip
    # the compositional agent: 3 iterations of outcome discovery (PPO of the skills, relabelled
    # imitation, discriminator), then 3 of the decision-level controller with the library
    # fine-tuned; its own budget (the phase split depends on it)
    "compositional": {
        "primitives": "discovered",
        "num_envs": 4,
        "hidden": 16,
        "key_dim": 8,
        "library_hidden": 16,
        "library_finetune": "on",
        "total_env_steps": 768,
        "library_fraction": 0.5,
        "ppo": {"num_steps": 32},
        "skills": {"num_steps": 32},
    },
    # the same agent on Meta-World: Gaussian options of fixed length, discovery from
    # displacements (discriminator on every rank's segments in the 1-process order)
    "compositional_mw": {
        "env_id": "CompoMetaWorld-v0",
        "split_family": "ML1:reach-v3",  # one MuJoCo model per env
        "env_kwargs": {"max_steps": 32},
        "primitives": "discovered",
        "num_envs": 4,
        "t_max": 8,
        "hidden": 16,
        "key_dim": 8,
        "library_hidden": 16,
        "library_finetune": "on",
        "total_env_steps": 768,
        "library_fraction": 0.5,
        "ppo": {"num_steps": 32},
        "skills": {"num_steps": 32},
    },
    # the DIAYN library: PPO of the skills on log q(k | phi), the discriminator on a buffer
    "discovery": {"num_envs": 4, "total_env_steps": 384, "training": {"ppo": {"num_steps": 32}}},
}
# the compositional agent with phase 2 continuing the discovery objective on its segments,
# and the state-conditioned graph (its network fitted on every rank's segments)
CONFIGS["compositional_cd"] = {
    **CONFIGS["compositional"],
    "library_finetune": "discovery",
    "graph": "state",
}
META = ("maml", "fomaml", "reptile")
#: methods whose policy memory holds (envs, ...) tensors (RL²'s is (layers, envs, ...)); their
#: rollouts are recorded from a real 1-process ``fit`` (their collectors come with a phase)
ENVS_FIRST_MEMORY = ("compositional", "compositional_cd", "compositional_mw", "discovery")
#: the registry method of a case whose name is not one
METHOD_OF = {"compositional_mw": "compositional", "compositional_cd": "compositional"}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# -- 1. the update: replayed rollouts, 1 vs 2 processes --------------------------------------------
def shard_rollout(ro, rank: int, world: int, memory_dim: int = 1):
    """Rank ``rank``'s columns of a (T, N) rollout: envs ``[rank n, (rank+1) n)``."""
    n = ro.obs.shape[1] // world
    lo, hi = rank * n, (rank + 1) * n

    def cut(x, dim):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(cut(m, dim) for m in x)
        return x.narrow(dim, lo, n)

    fields = {}
    for f in dataclasses.fields(ro):
        x = getattr(ro, f.name)
        if f.name in ("last_value", "next_trial_start"):
            fields[f.name] = cut(x, 0)
        elif f.name == "memory_start":
            fields[f.name] = cut(x, memory_dim)
        elif f.name == "extras":
            fields[f.name] = {k: cut(v, 1) for k, v in x.items()}
        elif f.name == "episodes":
            fields[f.name] = [
                dataclasses.replace(e, env_index=e.env_index - lo)
                for e in x
                if lo <= e.env_index < hi
            ]
        else:
            fields[f.name] = cut(x, 1)
    return type(ro)(**fields)


def replay_main(method: str, devices: int, rollouts_path: str, out: str) -> None:
    """Train ``method`` for ``ITERATIONS`` on the stored rollouts (this rank's shard of each)
    through ``rl.train.fit``; rank 0 saves the parameters and the log rows to ``out``."""
    from experiments.registry import method_class
    from rl import distributed
    from rl.collect import Collector
    from rl.train import fit

    stored = torch.load(rollouts_path, weights_only=False)  # written by this test
    cls = method_class(METHOD_OF.get(method, method))
    served = [0]  # rollouts served so far, over every collector of the run (the agent's phases)
    memory_dim = 0 if method in ENVS_FIRST_MEMORY else 1

    class ReplayCollector(Collector):
        """A real collector (real envs, real policy) whose rollouts are the stored ones."""

        def collect(self, num_steps: int):
            rank, world = distributed.world()
            ro = shard_rollout(stored[served[0]], rank, world, memory_dim)
            served[0] += 1
            self.env_steps += int(ro.valid.sum())
            return ro

        def collect_trials(self, tasks, max_steps: int = 1_000_000):
            assert len(tasks) == self.n  # this rank's share of the meta-batch
            return self.collect(0)

    class Replay(cls):
        def make_collector(self):
            real = super().make_collector()
            col = ReplayCollector(
                real.envs, real.policy, seed=int(self.cfg.seed), task_sampler=real.task_sampler
            )
            discovery = getattr(self, "discovery", None)
            if discovery is not None and real is discovery.collector:  # phase 1 collects there
                discovery.collector = col
            return col

    budget = sum(int(ro.valid.sum()) for ro in stored)  # ITERATIONS iterations
    module = Replay({"total_env_steps": budget, **CONFIGS[method], "compositions": None})
    strategy = "ddp" if devices > 1 else "auto"
    fit(module, Path(out).with_suffix(".run"), logger=False, devices=devices, strategy=strategy)
    if distributed.world()[0] == 0:
        torch.save({"params": module.state_dict(), "history": module.history}, out)


def _record_rollouts(method: str, path: Path) -> dict:
    """``ITERATIONS`` real rollouts of the initial policy, all ``num_envs`` envs in 1 process
    (the meta-batch methods: the pre- and post-update trials of ``ITERATIONS`` real
    meta-iterations of one process; PEARL: ``ITERATIONS`` trials of its initial policy on pool
    tasks). Returns the initial parameters."""
    from experiments.registry import method_class

    cfg = {**CONFIGS[method], "compositions": None}
    cls = method_class(METHOD_OF.get(method, method))
    module = cls(cfg)
    init = {k: v.clone() for k, v in module.state_dict().items()}
    if method in ENVS_FIRST_MEMORY:  # a real 1-process run, its rollouts of every phase kept
        from rl.train import fit

        rollouts = []

        class Recorder(cls):
            def make_collector(self):
                col = super().make_collector()
                real = col.collect

                def collect(num_steps: int):
                    rollouts.append(real(num_steps))
                    return rollouts[-1]

                col.collect = collect
                return col

        fit(Recorder(cfg), path.with_suffix(".run"), logger=False)
        torch.save(rollouts, path)
        return init
    if method == "pearl":
        col = module.make_collector()
        rollouts = []
        for _ in range(ITERATIONS):
            ids = torch.randperm(len(module.task_pool))[: cfg["num_envs"]]
            rollouts.append(col.collect_trials([module._trial_task(int(k)) for k in ids]))
    elif method in META:
        module.collector = col = module.make_collector()
        rollouts, trials = [], col.collect_trials

        def record(tasks, max_steps: int = 1_000_000):
            rollouts.append(trials(tasks, max_steps))
            return rollouts[-1]

        col.collect_trials = record
        for _ in range(ITERATIONS):
            module.meta_step()
    else:
        col = module.make_collector()
        rollouts = [col.collect(cfg["ppo"]["num_steps"]) for _ in range(ITERATIONS)]
    col.envs.close()
    torch.save(rollouts, path)
    return init


def _run_replay(methods: list[str], devices: int, tmp: Path) -> dict:
    """1 process: here; 2: ``python tests/test_ddp.py replay`` (Lightning starts rank 1)."""
    for m in methods if devices == 1 else ():
        replay_main(m, 1, str(tmp / f"{m}-rollouts.pt"), str(tmp / f"{m}-1.pt"))
    if devices > 1:
        cmd = [PY, __file__, "replay", str(devices), str(tmp), *methods]
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
    return {m: torch.load(tmp / f"{m}-{devices}.pt", weights_only=False) for m in methods}


@pytest.mark.parametrize(
    "methods",
    [
        ["ppo", "rl2"],
        list(META),
        ["pearl", "compositional", "discovery"],
        ["compositional_mw", "compositional_cd"],
    ],
    ids=[
        "ppo-rl2",
        "maml-family",
        "pearl-compositional-discovery",
        "compositional-metaworld-continued",
    ],
)
def test_two_processes_update_as_one(tmp_path, methods):
    init = {m: _record_rollouts(m, tmp_path / f"{m}-rollouts.pt") for m in methods}
    one = _run_replay(methods, 1, tmp_path)
    two = _run_replay(methods, 2, tmp_path)
    for m in methods:
        diff = max((one[m]["params"][k] - two[m]["params"][k]).abs().max().item() for k in init[m])
        moved = max((one[m]["params"][k] - init[m][k]).abs().max().item() for k in init[m])
        atol = ATOL_TRPO if m == "maml" else ATOL
        assert diff < atol, (m, diff)
        assert moved > 100 * atol, (m, moved)  # the tolerance is small against the training
        h1, h2 = one[m]["history"], two[m]["history"]
        assert [r["env_steps"] for r in h1] == [r["env_steps"] for r in h2]
        if m in META:  # the whole meta-batch's numbers on every rank
            for r1, r2 in zip(h1, h2):
                for k in ("charts/pre_success", "charts/post_return"):  # the data: the same
                    assert r2[k] == pytest.approx(r1[k], rel=1e-6), (m, k)
                assert r2["losses/outer_loss"] == pytest.approx(
                    r1["losses/outer_loss"], rel=1e-4, abs=1e-5
                ), m
                if m == "maml":
                    assert r2["trpo/accepted"] == r1["trpo/accepted"]
                    assert r2["trpo/grad_norm"] == pytest.approx(r1["trpo/grad_norm"], rel=2e-3)
            continue
        if m in ("compositional", "compositional_cd", "compositional_mw"):  # both phases: all envs
            assert [r["charts/phase"] for r in h1] == [1.0] * 3 + [2.0] * 3
            parts = ("library.", "discriminator.", "controller.", "composer.")
            if m == "compositional_cd":
                parts += ("graph.net.",)
            for part in parts:  # all trained
                assert max(
                    (one[m]["params"][k] - init[m][k]).abs().max().item()
                    for k in init[m] if k.startswith(part)
                ) > 100 * atol, part  # fmt: skip
            assert torch.equal(one[m]["params"]["graph.tries"], two[m]["params"]["graph.tries"])
            for r1, r2 in zip(h1, h2):
                keys = [k for k in r1 if k.startswith(("discovery/", "losses/", "charts/"))]
                keys = [k for k in keys if k != "charts/SPS"]
                assert keys and all(k in r2 for k in keys)
                for k in keys:
                    assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (m, k)
            continue
        if m == "discovery":  # rewards from the (replicated) discriminator: equal within fp
            assert max((one[m]["params"][k] - init[m][k]).abs().max().item()
                       for k in init[m] if k.startswith("discriminator.")) > 100 * atol  # fmt: skip
            for r1, r2 in zip(h1, h2):
                for k in ("losses/loss_policy", "losses/disc_loss", "charts/disc_accuracy"):
                    assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (m, k)
            continue
        if m == "pearl":  # every rank stored every rank's trials: the same buffers, same draws
            for r1, r2 in zip(h1, h2):
                assert r2["charts/updates"] == r1["charts/updates"]
                assert r2["charts/success"] == r1["charts/success"]
                for k in ("losses/loss_critic", "losses/loss_actor", "losses/loss_kl"):
                    assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (m, k)
            continue
        for r1, r2 in zip(h1, h2):
            for k in ("losses/loss_policy", "losses/loss_value", "losses/approx_kl"):
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-7), (m, k)
            # gathered values/returns in the 1-process layout: the very same numbers
            assert r2["losses/explained_variance"] == r1["losses/explained_variance"]


def test_shards_start_as_the_one_process_envs():
    """What ``Collector.shard`` promises: each env's first task, first episode seed and so
    first observation are the 1-process run's for the same env index; later draws are each
    rank's own."""
    from envs import Composition, make_split
    from rl.collect import Collector, FeedForwardPolicy, Task, make_vector_env, uniform_task_sampler
    from rl.nets import ActorCritic

    train = make_split("grid", seed=0).train

    def collector(n: int, rank: int = 0, world: int = 1) -> Collector:
        envs = make_vector_env("CompoGrid-v0", n, {"composition": train[0]})
        net = ActorCritic(envs.single_observation_space.shape[0], envs.single_action_space, 8)
        col = Collector(
            envs, FeedForwardPolicy(net), task_sampler=uniform_task_sampler(train, True), seed=3
        )
        col.shard(rank, world)
        return col

    one, shards = collector(4), [collector(2, r, 2) for r in range(2)]
    ro = one.collect(1)
    parts = [c.collect(1) for c in shards]
    assert [t for c in shards for t in c.tasks] == one.tasks
    assert [s for c in shards for s in c.ep_seed] == one.ep_seed
    assert torch.equal(torch.cat([p.obs for p in parts], dim=1), ro.obs)
    assert shards[0].rng.integers(2**31) != shards[1].rng.integers(2**31)

    # MAML's trials: each rank is given its slice of the meta-batch; the first trials start
    # as the 1-process ones (same episode seeds), later draws are each rank's own
    one, shards = collector(4), [collector(2, r, 2) for r in range(2)]
    tasks = [Task(Composition.parse(train[0]), None) for _ in range(4)]  # layouts from the seeds
    ro = one.collect_trials(tasks)
    parts = [c.collect_trials(tasks[2 * r : 2 * r + 2]) for r, c in enumerate(shards)]
    assert torch.equal(torch.cat([p.obs[0] for p in parts]), ro.obs[0])
    assert not torch.equal(ro.obs[0, 0], ro.obs[0, 2])  # one composition, four layouts
    assert shards[0].rng.integers(2**31) != shards[1].rng.integers(2**31)


# -- 2. end to end through compo train ------------------------------------------------------------
TRAIN = [
    "--method", "ppo", "--quiet", "--logger", "csv",
    "--set", "num_envs=4", "--set", "ppo.num_steps=32", "--set", "total_env_steps=768",
]  # fmt: skip
STEPS_PER_ITERATION = 4 * 32
FULL = 768 // STEPS_PER_ITERATION


def _train(
    out: Path, *extra: str, check: bool = True, args: list[str] = TRAIN
) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [COMPO, "train", *args, "--out", str(out), *extra],
        env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _killed_run(out: Path, rows: int, args: list[str] = TRAIN) -> int:
    """Start a 2-process run and SIGKILL all its processes once its log has ``rows`` rows and
    a checkpoint exists; returns the checkpoint's iteration."""
    cmd = [COMPO, "train", *args, "--out", str(out), "--devices", "2", "--strategy", "ddp"]
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # rank 1 (started by Lightning) shares the process group
    )  # fmt: skip
    ckpt, log = out / "checkpoints" / "last.ckpt", out / "train_log.jsonl"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.is_file() and log.is_file() and log.read_text().count("\n") >= rows:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _ckpt(out)["rl_state"]["iteration"]


def test_ddp_train_kill_resume_same_and_other_n(tmp_path):
    ref = tmp_path / "uninterrupted"
    r = _train(ref, "--devices", "2", "--strategy", "ddp")
    assert r.stdout.count("env steps") == 1  # rank 0 reports; rank 1 says nothing
    rows = _log(ref)
    assert [r["env_steps"] for r in rows] == [STEPS_PER_ITERATION * (i + 1) for i in range(FULL)]
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == ["final.ckpt", "last.ckpt"]
    st = _ckpt(ref)["rl_state"]
    assert st["world_size"] == 2 and st["env_steps"] == 768 and st["iteration"] == FULL
    # each rank stepped its half of the envs (2 of 4), 384 env steps each
    assert [len(x["collector"]["tasks"]) for x in st["ranks"]] == [2, 2]
    assert [x["collector"]["env_steps"] for x in st["ranks"]] == [384, 384]
    # the ranks act on different streams: their envs' episodes differ
    assert st["ranks"][0]["collector"]["ep_seed"] != st["ranks"][1]["collector"]["ep_seed"]

    killed = tmp_path / "killed"
    it = _killed_run(killed, 2)
    assert 1 <= it < FULL, f"the run was not interrupted (checkpoint of iteration {it})"
    other_n = tmp_path / "killed_then_1"
    subprocess.run(["cp", "-a", str(killed), str(other_n)], check=True)

    # same N: the run ends as the uninterrupted one did, bit for bit
    _train(killed, "--devices", "2", "--strategy", "ddp", "--resume")
    a, b = _ckpt(ref), _ckpt(killed)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    strip = ("charts/SPS",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in _log(killed)] == [
        {k: v for k, v in r.items() if k not in strip} for r in rows
    ]

    # another N: 1 process continues the 2-process checkpoint to the end of the budget
    r = _train(other_n, "--resume")
    st = _ckpt(other_n)["rl_state"]
    assert st["iteration"] == FULL and st["env_steps"] == 768 and "world_size" not in st
    assert [r["iteration"] for r in _log(other_n)] == list(range(1, FULL + 1))
    assert [r["env_steps"] for r in _log(other_n)] == [r["env_steps"] for r in rows]
    assert all(torch.isfinite(v).all() for v in _ckpt(other_n)["state_dict"].values())


MAML_TRAIN = [
    "--method", "maml", "--quiet", "--logger", "csv", "--set", "meta_batch_size=4",
    "--set", "hidden=16", "--set", "outer_optimizer=trpo", "--set", "total_env_steps=6000",
]  # fmt: skip
PEARL_TRAIN = [
    "--method", "pearl", "--quiet", "--logger", "csv", "--set", "num_envs=4",
    "--set", "hidden=16", "--set", "encoder_hidden=16", "--set", "num_train_tasks=8",
    "--set", "batch_size=16", "--set", "context_batch=8", "--set", "updates_per_env_step=0.02",
    "--set", "total_env_steps=4000",
]  # fmt: skip


#: phase 1 (outcome discovery) 3 iterations, phase 2 (controller, library fine-tuned) 3: the
#: kill lands in phase 1, so the resume crosses the phase boundary
COMPOSITIONAL_TRAIN = [
    "--method", "compositional", "--quiet", "--logger", "csv", "--set", "num_envs=4",
    "--set", "hidden=16", "--set", "key_dim=8", "--set", "library_hidden=16",
    "--set", "library_finetune=on", "--set", "library_fraction=0.5",
    "--set", "ppo.num_steps=32", "--set", "skills.num_steps=32", "--set", "total_env_steps=768",
]  # fmt: skip


#: discovery continued in phase 2 with every second phase-2 rollout discovery's own (in its
#: room, sharded like phase 1's): phase 1 3 iterations, phase 2 4 (turns at the 2nd and 4th)
COMPOSITIONAL_SHARED_TRAIN = [
    "--method", "compositional", "--quiet", "--logger", "csv", "--set", "num_envs=4",
    "--set", "hidden=16", "--set", "key_dim=8", "--set", "library_hidden=16",
    "--set", "library_finetune=discovery", "--set", "discovery_share=0.5",
    "--set", "library_fraction=0.27", "--set", "ppo.num_steps=64", "--set", "skills.num_steps=32",
    "--set", "total_env_steps=1408",
]  # fmt: skip


@pytest.mark.parametrize(
    "args, budget",
    [
        (MAML_TRAIN, 6000),
        (PEARL_TRAIN, 4000),
        (COMPOSITIONAL_TRAIN, 768),
        (COMPOSITIONAL_SHARED_TRAIN, 1408),
    ],
    ids=["maml", "pearl", "compositional", "compositional-discovery-share"],
)
def test_ddp_meta_kill_resume_same_and_other_n(tmp_path, args, budget):
    """MAML's meta-batch spread over 2 processes (each rank adapts 2 of the 4 tasks); PEARL's
    trials and update meta-batch likewise, with its replay buffers in the checkpoint; the
    compositional agent's envs, killed in phase 1. A SIGKILLed run resumed under 2 processes
    ends bit-for-bit as the uninterrupted one, under 1 it finishes the budget."""
    ref = tmp_path / "uninterrupted"
    _train(ref, "--devices", "2", "--strategy", "ddp", args=args)
    rows = _log(ref)
    st = _ckpt(ref)["rl_state"]
    full = st["iteration"]
    assert st["world_size"] == 2 and st["env_steps"] >= budget and full == len(rows) >= 3
    assert st["env_steps"] == sum(x["collector"]["env_steps"] for x in st["ranks"])

    killed = tmp_path / "killed"
    it = _killed_run(killed, 1, args=args)
    assert 1 <= it < full, f"the run was not interrupted (checkpoint of iteration {it})"
    if args in (COMPOSITIONAL_TRAIN, COMPOSITIONAL_SHARED_TRAIN):  # killed in phase 1: the
        assert it < 3 and rows[-1]["charts/phase"] == 2.0  # resume crosses into phase 2
    if args is COMPOSITIONAL_SHARED_TRAIN:  # the turns' env steps count on every rank
        assert [r["iteration"] for r in rows if r.get("charts/discovery_turn")] == [5, 7]
        assert st["env_steps"] == budget
    other_n = tmp_path / "killed_then_1"
    subprocess.run(["cp", "-a", str(killed), str(other_n)], check=True)
    _train(killed, "--devices", "2", "--strategy", "ddp", "--resume", args=args)
    a, b = _ckpt(ref), _ckpt(killed)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    timing = ("charts/SPS", "time/")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(timing)}  # noqa: E731
    assert [strip(r) for r in _log(killed)] == [strip(r) for r in rows]

    _train(other_n, "--resume", args=args)
    st = _ckpt(other_n)["rl_state"]
    assert st["env_steps"] >= budget and "world_size" not in st
    assert [r["iteration"] for r in _log(other_n)] == list(range(1, st["iteration"] + 1))
    assert all(torch.isfinite(v).all() for v in _ckpt(other_n)["state_dict"].values())


# -- 3. bad layouts ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "compositional", "--devices", "2", "--set", "num_envs=5"], "num_envs=5 on 2"),
        (["--method", "pearl", "--devices", "2", "--set", "meta_batch=3"], "meta_batch=3 on 2"),
        (["--method", "maml", "--devices", "2", "--set", "meta_batch_size=3"], "meta_batch_size=3"),
        (["--method", "ppo", "--devices", "2", "--set", "num_envs=3"], "a multiple of 2"),
        (["--method", "ppo", "--devices", "0"], "--devices 0"),
        (["--method", "ppo", "--devices", "100000"], "--devices 100000"),
        (["--method", "ppo", "--num-nodes", "0"], "--num-nodes 0"),
    ],
)
def test_bad_layout_one_line(tmp_path, capsys, args, message):
    from experiments.cli import main

    out = tmp_path / "run"
    code = main(["train", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


if __name__ == "__main__":
    if sys.argv[1] == "replay":  # replay DEVICES DIR METHOD...
        devices, tmp = int(sys.argv[2]), Path(sys.argv[3])
        for method in sys.argv[4:]:
            rollouts, out = tmp / f"{method}-rollouts.pt", tmp / f"{method}-{devices}.pt"
            replay_main(method, devices, str(rollouts), str(out))

"""Every bad input gets one line (issue 14): through the real console script, each case below
exits with code 2, prints exactly one line on stderr naming the bad value, and writes nothing
(its ``--out`` folder stays absent or unchanged, its working folder stays empty).

Rule for ``--config``/``--set``/``--seed`` where a command has no such keys: a command honours
them where it has config keys (``train``, ``heldout``, ``ablate``, ``embed``, ``eval``) or
randomness (``trace --seed``) and rejects them in one line otherwise (``trace --config/--set``,
``graph --config/--set/--seed``).

Each case costs about 3.8 CPU-s of imports in a fresh process. So every case that needs no
config or checkpoint, and the first ``PROCESS_PER_COMMAND`` config/checkpoint cases of each
command, run as a fresh ``compo`` process (what a user runs, import-time output included); the
other config/checkpoint cases of a command run one after another inside one fresh Python
process through ``experiments.cli.main`` (the console script's function), each in its own
working folder with its own stderr and exit code. Every case is rejected before the first env
step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_resume import _compo  # the console script, as compo train's kill tests run it

from experiments.cli import main

#: the tiny PPO and compositional runs the checkpoint cases start from
TINY_PPO = ["--set", "total_env_steps=64", "--set", "num_envs=2", "--set", "ppo.num_steps=32"]
TINY_COMPO = [
    "--set", "primitives=supervised", "--set", "total_env_steps=256", "--set", "num_envs=2",
    "--set", "episodes_per_trial=1", "--set", "hidden=8", "--set", "key_dim=4",
    "--set", "library_hidden=8", "--set", "library_fraction=0.5",
    "--set", "ppo.num_steps=16", "--set", "skills.num_steps=16",
]  # fmt: skip

COMMANDS = ("train", "heldout", "ablate", "trace", "graph", "embed", "eval", "diagnose",
            "metaworld-eval")  # fmt: skip
#: seconds a case may take: imports and validation only, never an env step
TIMEOUT = 60
PPO = "{ws}/ppo/checkpoints/final.ckpt"
COMPO = "{ws}/compo/checkpoints/final.ckpt"
RUN = "{ws}/ppo"  # a finished compo train run

# (id, argv, text the one error line must contain); --out {out} is added unless given
CASES: list[tuple[str, list[str], str]] = [
    # -- train: arguments ---------------------------------------------------------------------
    ("train-method-unknown", ["train", "--method", "ppo2"], "ppo2"),
    ("train-method-missing", ["train"], "--method"),
    ("train-seed-text", ["train", "--method", "ppo", "--seed", "x1"], "x1"),
    ("train-seed-float", ["train", "--method", "ppo", "--seed", "1.5"], "1.5"),
    ("train-seed-negative", ["train", "--method", "ppo", "--seed", "-1"], "-1"),
    ("train-unknown-flag", ["train", "--method", "ppo", "--bogus"], "--bogus"),
    ("train-ckpt-every-0", ["train", "--method", "ppo", "--checkpoint-every", "0"], "0"),
    ("train-ckpt-every-neg", ["train", "--method", "ppo", "--checkpoint-every", "-2"], "-2"),
    ("train-ckpt-every-text", ["train", "--method", "ppo", "--checkpoint-every", "x"], "'x'"),
    ("train-config-missing", ["train", "--method", "ppo", "--config", "{ws}/none.yaml"],
     "none.yaml"),
    ("train-config-broken", ["train", "--method", "ppo", "--config", "{ws}/broken.yaml"],
     "broken.yaml"),
    ("train-config-list", ["train", "--method", "ppo", "--config", "{ws}/list.yaml"],
     "list.yaml"),
    ("train-config-folder", ["train", "--method", "ppo", "--config", "{ws}"], "{ws}"),
    ("train-config-binary", ["train", "--method", "ppo", "--config", "{ws}/random.ckpt"],
     "random.ckpt"),
    ("train-config-unknown-key", ["train", "--method", "ppo", "--config", "{ws}/unknown.yaml"],
     "bogus_key"),
    ("train-set-no-equals", ["train", "--method", "ppo", "--set", "lr"], "lr"),
    ("train-set-unknown", ["train", "--method", "ppo", "--set", "learning_rate=1"],
     "learning_rate"),
    ("train-set-unknown-nested", ["train", "--method", "ppo", "--set", "ppo.bogus=1"],
     "ppo.bogus"),
    ("train-set-broken-yaml", ["train", "--method", "ppo", "--set", "ppo.lr=[1"], "ppo.lr"),
    ("train-set-scalar-nested", ["train", "--method", "ppo", "--set", "ppo=5"], "ppo"),
    ("train-set-nested-scalar", ["train", "--method", "ppo", "--set", "seed.x=5"], "seed"),
    ("train-lr-nan", ["train", "--method", "ppo", "--set", "ppo.lr=.nan"], "nan"),
    ("train-lr-inf", ["train", "--method", "ppo", "--set", "ppo.lr=.inf"], "inf"),
    ("train-lr-nan-text", ["train", "--method", "ppo", "--set", "ppo.lr=nan"], "nan"),
    ("train-lr-negative", ["train", "--method", "ppo", "--set", "ppo.lr=-0.1"], "-0.1"),
    ("train-lr-zero", ["train", "--method", "ppo", "--set", "ppo.lr=0"], "lr=0"),
    ("train-lr-text", ["train", "--method", "ppo", "--set", "ppo.lr=fast"], "fast"),
    ("train-lr-bool", ["train", "--method", "ppo", "--set", "ppo.lr=true"], "True"),
    ("train-gamma-above-1", ["train", "--method", "ppo", "--set", "ppo.gamma=1.5"], "1.5"),
    ("train-gae-lambda-neg", ["train", "--method", "ppo", "--set", "ppo.gae_lambda=-1"], "-1"),
    ("train-clip-negative", ["train", "--method", "ppo", "--set", "ppo.clip_coef=-0.2"], "-0.2"),
    ("train-ent-coef-inf", ["train", "--method", "ppo", "--set", "ppo.ent_coef=.inf"], "inf"),
    ("train-grad-norm-nan", ["train", "--method", "ppo", "--set", "ppo.max_grad_norm=.nan"],
     "nan"),
    ("train-num-steps-0", ["train", "--method", "ppo", "--set", "ppo.num_steps=0"], "0"),
    ("train-epochs-0", ["train", "--method", "ppo", "--set", "ppo.update_epochs=0"], "0"),
    ("train-minibatches-0", ["train", "--method", "ppo", "--set", "ppo.num_minibatches=0"], "0"),
    ("train-minibatches-too-many",
     ["train", "--method", "ppo", "--set", "ppo.num_minibatches=100000"], "100000"),
    ("train-num-envs-0", ["train", "--method", "ppo", "--set", "num_envs=0"], "0"),
    ("train-num-envs-huge", ["train", "--method", "ppo", "--set", "num_envs=10000000"],
     "10000000"),
    ("train-num-envs-float", ["train", "--method", "ppo", "--set", "num_envs=2.5"], "2.5"),
    ("train-num-envs-nan", ["train", "--method", "ppo", "--set", "num_envs=.nan"], "nan"),
    ("train-budget-0", ["train", "--method", "ppo", "--set", "total_env_steps=0"], "0"),
    ("train-budget-huge", ["train", "--method", "ppo", "--set", "total_env_steps=1e15"],
     "total_env_steps"),
    ("train-budget-inf", ["train", "--method", "ppo", "--set", "total_env_steps=.inf"], "inf"),
    ("train-budget-below-rollout", ["train", "--method", "ppo", "--set", "total_env_steps=100"],
     "100"),
    ("train-episodes-per-trial-0", ["train", "--method", "rl2", "--set", "episodes_per_trial=0"],
     "0"),
    ("train-episodes-per-trial-huge",
     ["train", "--method", "rl2", "--set", "episodes_per_trial=100000000"], "100000000"),
    ("train-hidden-negative", ["train", "--method", "ppo", "--set", "hidden=-4"], "-4"),
    ("train-seed-set-nan", ["train", "--method", "ppo", "--set", "seed=.nan"], "nan"),
    ("train-env-id-typo", ["train", "--method", "ppo", "--set", "env_id=CompoGird-v0"],
     "CompoGird-v0"),
    ("train-env-kwarg-unknown", ["train", "--method", "ppo", "--set", "env_kwargs.colour=3"],
     "colour"),
    ("train-env-kwarg-size", ["train", "--method", "ppo", "--set", "env_kwargs.size=2"], "2"),
    ("train-env-kwarg-task-info",
     ["train", "--method", "ppo", "--set", "env_kwargs.task_info=telepathy"], "telepathy"),
    ("train-env-kwargs-scalar", ["train", "--method", "ppo", "--set", "env_kwargs=3"],
     "env_kwargs"),
    ("train-compositions-empty", ["train", "--method", "ppo", "--set", "compositions=[]"],
     "compositions"),
    ("train-compositions-scalar", ["train", "--method", "ppo", "--set", "compositions=7"], "7"),
    ("train-composition-unknown",
     ["train", "--method", "ppo", "--composition", "pickup(purple unicorn)"], "purple unicorn"),
    ("train-composition-empty", ["train", "--method", "ppo", "--composition", ""], "''"),
    ("train-split-family", ["train", "--method", "rl2", "--set", "split_family=gird"], "gird"),
    ("train-vectorization", ["train", "--method", "ppo", "--set", "vectorization=gpu"], "gpu"),
    ("train-fixed-layout-text", ["train", "--method", "ppo", "--set", "fixed_layout=maybe"],
     "maybe"),
    ("train-out-is-file", ["train", "--method", "ppo", "--out", "{ws}/afile"], "afile"),
    ("train-out-under-file", ["train", "--method", "ppo", "--out", "{ws}/afile/run"], "afile"),
    ("train-out-exists", ["train", "--method", "ppo", "--out", RUN, *TINY_PPO], "--overwrite"),
    ("train-resume-nothing", ["train", "--method", "ppo", "--resume"], "no run to resume"),
    ("train-resume-other-method", ["train", "--method", "rl2", "--out", RUN, "--resume"],
     "rl2"),
    ("train-resume-other-seed", ["train", "--method", "ppo", "--out", RUN, *TINY_PPO,
                                 "--seed", "7", "--resume"], "seed=7"),
    ("train-resume-overwrite", ["train", "--method", "ppo", "--resume", "--overwrite"],
     "--overwrite"),
    # -- train: method configs ----------------------------------------------------------------
    ("rl2-rnn", ["train", "--method", "rl2", "--set", "rnn=transformer"], "transformer"),
    ("rl2-bptt-0", ["train", "--method", "rl2", "--set", "bptt_len=0"], "0"),
    ("maml-inner-lr-nan", ["train", "--method", "maml", "--set", "inner_lr=.nan"], "nan"),
    ("maml-meta-batch-0", ["train", "--method", "maml", "--set", "meta_batch_size=0"], "0"),
    ("maml-surrogate", ["train", "--method", "maml", "--set", "surrogate=magic"], "magic"),
    ("fomaml-outer-lr-inf", ["train", "--method", "fomaml", "--set", "outer_lr=.inf"], "inf"),
    ("reptile-eps-nan", ["train", "--method", "reptile", "--set", "reptile_eps=.nan"], "nan"),
    ("pearl-batch-0", ["train", "--method", "pearl", "--set", "batch_size=0"], "0"),
    ("pearl-aggregation", ["train", "--method", "pearl", "--set", "aggregation=median"],
     "median"),
    ("pearl-tau-above-1", ["train", "--method", "pearl", "--set", "tau=2"], "2"),
    ("pearl-updates-nan", ["train", "--method", "pearl", "--set", "updates_per_env_step=.nan"],
     "nan"),
    ("compo-composer", ["train", "--method", "compositional", "--set", "composer=magic"],
     "magic"),
    ("compo-primitives", ["train", "--method", "compositional", "--set", "primitives=learned"],
     "learned"),
    ("compo-library-fraction", ["train", "--method", "compositional", "--set",
                                "library_fraction=1.5"], "1.5"),
    ("compo-skills-scalar", ["train", "--method", "compositional", "--set", "skills=3"],
     "skills"),
    ("compo-library-ckpt-missing", ["train", "--method", "compositional", "--set",
                                    "library_checkpoint={ws}/none.ckpt"], "none.ckpt"),
    ("compo-library-ckpt-random", ["train", "--method", "compositional", "--set",
                                   "library_checkpoint={ws}/random.ckpt"], "random.ckpt"),
    ("discovery-num-skills-0", ["train", "--method", "discovery", "--set", "num_skills=0"], "0"),
    ("discovery-objective", ["train", "--method", "discovery", "--set", "objective=vic"],
     "vic"),
    # -- heldout --------------------------------------------------------------------------------
    ("heldout-seeds-empty", ["heldout", "--set", "seeds=[]"], "seeds"),
    ("heldout-seeds-scalar", ["heldout", "--set", "seeds=3"], "3"),
    ("heldout-seeds-text", ["heldout", "--set", "seeds=[a]"], "a"),
    ("heldout-seed-text", ["heldout", "--seed", "two"], "two"),
    ("heldout-methods-unknown", ["heldout", "--set", "methods=[ppo2]"], "ppo2"),
    ("heldout-methods-scalar", ["heldout", "--set", "methods=ppo"], "ppo"),
    ("heldout-no-rows", ["heldout", "--set", "methods=[]", "--set", "references=[]"],
     "methods=[]"),
    ("heldout-reference-unknown", ["heldout", "--set", "references=[orcale]"], "orcale"),
    ("heldout-family", ["heldout", "--set", "family=gird"], "gird"),
    ("heldout-budget-0", ["heldout", "--set", "total_env_steps=0"], "0"),
    ("heldout-budget-nan", ["heldout", "--set", "total_env_steps=.nan"], "nan"),
    ("heldout-num-envs-huge", ["heldout", "--set", "num_envs=10000000"], "10000000"),
    ("heldout-eval-scalar", ["heldout", "--set", "eval=5"], "eval"),
    ("heldout-eval-episodes-0", ["heldout", "--set", "eval.episodes=0"], "0"),
    ("heldout-eval-episodes-huge", ["heldout", "--set", "eval.episodes=1000000000"],
     "1000000000"),
    ("heldout-eval-tasks-nan", ["heldout", "--set", "eval.num_tasks=.nan"], "nan"),
    ("heldout-eval-num-envs-huge", ["heldout", "--set", "eval.num_envs=10000000"], "10000000"),
    ("heldout-eval-bootstrap-neg", ["heldout", "--set", "eval.bootstrap=-5"], "-5"),
    ("heldout-eval-unknown", ["heldout", "--set", "eval.episode=3"], "eval.episode"),
    ("heldout-method-config-nan", ["heldout", "--set", "method_config.ppo.ppo.lr=.nan"], "nan"),
    ("heldout-method-config-unknown", ["heldout", "--set", "method_config.ppo.bogus=1"],
     "bogus"),
    ("heldout-method-config-shared", ["heldout", "--set", "method_config.ppo.seed=3"], "seed"),
    ("heldout-env-id-typo", ["heldout", "--set", "env_id=CompoGrid-v9"], "CompoGrid-v9"),
    ("heldout-env-kwarg-unknown", ["heldout", "--set", "env_kwargs.colour=3"], "colour"),
    ("heldout-split-kwargs-unknown", ["heldout", "--set", "split_kwargs.bogus=1"], "bogus"),
    ("heldout-config-broken", ["heldout", "--config", "{ws}/broken.yaml"], "broken.yaml"),
    ("heldout-config-missing", ["heldout", "--config", "{ws}/none.yaml"], "none.yaml"),
    ("heldout-out-file", ["heldout", "--out", "{ws}/afile"], "afile"),
    ("heldout-out-under-file", ["heldout", "--out", "{ws}/afile/run"], "afile"),
    ("heldout-resume-nothing", ["heldout", "--resume"], "no run to resume"),
    ("heldout-resume-overwrite", ["heldout", "--resume", "--overwrite"], "--overwrite"),
    # -- ablate ---------------------------------------------------------------------------------
    ("ablate-variants-empty", ["ablate", "--set", "variants=[]"], "variants"),
    ("ablate-variants-unknown", ["ablate", "--set", "variants=[composer=magic]"],
     "composer=magic"),
    ("ablate-variants-scalar", ["ablate", "--set", "variants=full"], "full"),
    ("ablate-methods", ["ablate", "--set", "methods=[ppo]"], "methods"),
    ("ablate-base-scalar", ["ablate", "--set", "base=3"], "base"),
    ("ablate-base-bad", ["ablate", "--set", "base.composer=magic"], "magic"),
    ("ablate-seeds-empty", ["ablate", "--set", "seeds=[]"], "seeds"),
    ("ablate-seed-text", ["ablate", "--seed", "x"], "x"),
    ("ablate-eval-episodes-0", ["ablate", "--set", "eval.episodes=0"], "0"),
    ("ablate-config-missing", ["ablate", "--config", "{ws}/none.yaml"], "none.yaml"),
    ("ablate-resume-nothing", ["ablate", "--resume"], "no run to resume"),
    # -- trace ----------------------------------------------------------------------------------
    ("trace-no-checkpoint", ["trace", "--composition", "goto(red ball)"], "--checkpoint"),
    ("trace-no-composition", ["trace", "--checkpoint", PPO], "--composition"),
    ("trace-ckpt-missing", ["trace", "--checkpoint", "{ws}/none.ckpt", "--composition",
                            "goto(red ball)"], "none.ckpt"),
    ("trace-ckpt-empty", ["trace", "--checkpoint", "{ws}/empty.ckpt", "--composition",
                          "goto(red ball)"], "empty.ckpt"),
    ("trace-ckpt-random", ["trace", "--checkpoint", "{ws}/random.ckpt", "--composition",
                           "goto(red ball)"], "random.ckpt"),
    ("trace-ckpt-truncated", ["trace", "--checkpoint", "{ws}/truncated.ckpt", "--composition",
                              "goto(red ball)"], "truncated.ckpt"),
    ("trace-ckpt-pickle", ["trace", "--checkpoint", "{ws}/pickle.ckpt", "--composition",
                           "goto(red ball)"], "pickle.ckpt"),
    ("trace-ckpt-foreign", ["trace", "--checkpoint", "{ws}/foreign.ckpt", "--composition",
                            "goto(red ball)"], "foreign.ckpt"),
    ("trace-ckpt-yaml", ["trace", "--checkpoint", "{ws}/unknown.yaml", "--composition",
                         "goto(red ball)"], "unknown.yaml"),
    ("trace-ckpt-folder", ["trace", "--checkpoint", "{ws}", "--composition",
                           "goto(red ball)"], "{ws}"),
    ("trace-composition-unknown", ["trace", "--checkpoint", PPO, "--composition",
                                   "fly(moon)"], "fly(moon)"),
    ("trace-composition-empty", ["trace", "--checkpoint", PPO, "--composition", ""], "''"),
    ("trace-episodes-0", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                          "--episodes", "0"], "0"),
    ("trace-episodes-huge", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                             "--episodes", "100000000"], "100000000"),
    ("trace-episodes-text", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                             "--episodes", "two"], "two"),
    ("trace-layout-seed-neg", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                               "--layout-seed", "-3"], "-3"),
    ("trace-nmi-neg", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                       "--nmi-episodes", "-1"], "-1"),
    ("trace-nmi-huge", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                        "--nmi-episodes", "1000000000"], "1000000000"),
    ("trace-seed-neg", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                        "--seed", "-1"], "-1"),
    ("trace-config", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                      "--config", "{ws}/none.yaml"], "--config"),
    ("trace-set", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                   "--set", "episodes=3"], "--set"),
    ("trace-out-file", ["trace", "--checkpoint", PPO, "--composition", "goto(red ball)",
                        "--out", "{ws}/afile"], "afile"),
    # -- graph ----------------------------------------------------------------------------------
    ("graph-no-checkpoint", ["graph"], "--checkpoint"),
    ("graph-ckpt-random", ["graph", "--checkpoint", "{ws}/random.ckpt"], "random.ckpt"),
    ("graph-ckpt-truncated", ["graph", "--checkpoint", "{ws}/truncated.ckpt"],
     "truncated.ckpt"),
    ("graph-ckpt-empty", ["graph", "--checkpoint", "{ws}/empty.ckpt"], "empty.ckpt"),
    ("graph-not-compositional", ["graph", "--checkpoint", PPO], "ppo"),
    ("graph-config", ["graph", "--checkpoint", COMPO, "--config", "{ws}/unknown.yaml"],
     "--config"),
    ("graph-set", ["graph", "--checkpoint", COMPO, "--set", "x=1"], "--set"),
    ("graph-seed", ["graph", "--checkpoint", COMPO, "--seed", "3"], "--seed"),
    ("graph-out-file", ["graph", "--checkpoint", COMPO, "--out", "{ws}/afile"], "afile"),
    # -- embed ----------------------------------------------------------------------------------
    ("embed-no-checkpoint", ["embed"], "--checkpoint"),
    ("embed-ckpt-random", ["embed", "--checkpoint", "{ws}/random.ckpt"], "random.ckpt"),
    ("embed-ckpt-pickle", ["embed", "--checkpoint", "{ws}/pickle.ckpt"], "pickle.ckpt"),
    ("embed-unknown-option", ["embed", "--checkpoint", PPO, "--set", "tasks=5"], "tasks"),
    ("embed-num-tasks-2", ["embed", "--checkpoint", PPO, "--set", "num_tasks=2"], "2"),
    ("embed-num-tasks-huge", ["embed", "--checkpoint", PPO, "--set", "num_tasks=100000000"],
     "100000000"),
    ("embed-episodes-nan", ["embed", "--checkpoint", PPO, "--set", "episodes=.nan"], "nan"),
    ("embed-num-envs-0", ["embed", "--checkpoint", PPO, "--set", "num_envs=0"], "0"),
    ("embed-permutations-text", ["embed", "--checkpoint", PPO, "--set", "permutations=many"],
     "many"),
    ("embed-config-missing", ["embed", "--checkpoint", PPO, "--config", "{ws}/none.yaml"],
     "none.yaml"),
    ("embed-seed-text", ["embed", "--checkpoint", PPO, "--seed", "s"], "s"),
    ("embed-out-file", ["embed", "--checkpoint", PPO, "--out", "{ws}/afile"], "afile"),
    # -- eval -----------------------------------------------------------------------------------
    ("eval-no-checkpoint", ["eval"], "--checkpoint"),
    ("eval-ckpt-missing", ["eval", "--checkpoint", "{ws}/none.ckpt"], "none.ckpt"),
    ("eval-ckpt-truncated", ["eval", "--checkpoint", "{ws}/truncated.ckpt"], "truncated.ckpt"),
    ("eval-ckpt-foreign", ["eval", "--checkpoint", "{ws}/foreign.ckpt"], "foreign.ckpt"),
    ("eval-episodes-0", ["eval", "--checkpoint", PPO, "--set", "episodes=0"], "0"),
    ("eval-episodes-huge", ["eval", "--checkpoint", PPO, "--set", "episodes=100000000"],
     "100000000"),
    ("eval-num-tasks-inf", ["eval", "--checkpoint", PPO, "--set", "num_tasks=.inf"], "inf"),
    ("eval-num-envs-huge", ["eval", "--checkpoint", PPO, "--set", "num_envs=10000000"],
     "10000000"),
    ("eval-unknown-key", ["eval", "--checkpoint", PPO, "--set", "episode=3"], "episode"),
    ("eval-config-broken", ["eval", "--checkpoint", PPO, "--config", "{ws}/broken.yaml"],
     "broken.yaml"),
    ("eval-out-file", ["eval", "--checkpoint", PPO, "--out", "{ws}/afile"], "afile"),
    ("eval-out-exists", ["eval", "--checkpoint", PPO, "--out", RUN], "--overwrite"),
    # -- diagnose, metaworld-eval ----------------------------------------------------------------
    ("diagnose-no-task", ["diagnose", "--checkpoint", PPO], "--composition"),
    ("diagnose-task-and-composition", ["diagnose", "--checkpoint", PPO, "--task", "1",
                                       "--composition", "goto(red ball)"], "--task"),
    ("diagnose-task-text", ["diagnose", "--checkpoint", PPO, "--task", "first"], "first"),
    ("diagnose-ckpt-random", ["diagnose", "--checkpoint", "{ws}/random.ckpt", "--task", "0"],
     "random.ckpt"),
    ("diagnose-unknown-key", ["diagnose", "--checkpoint", PPO, "--task", "0", "--set",
                              "bogus=1"], "bogus"),
    ("metaworld-eval-ckpt-empty", ["metaworld-eval", "--checkpoint", "{ws}/empty.ckpt"],
     "empty.ckpt"),
    # -- no subcommand ----------------------------------------------------------------------------
    ("no-command", [], "command"),
    ("unknown-command", ["fly"], "fly"),
]  # fmt: skip


def _snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _workspace(ws: Path) -> None:
    """Two tiny trained runs, damaged checkpoints and config files."""
    assert main(["train", "--method", "ppo", "--out", str(ws / "ppo"), *TINY_PPO]) == 0
    compo = ["train", "--method", "compositional", "--out", str(ws / "compo"), *TINY_COMPO]
    assert main(compo) == 0
    good = (ws / "ppo" / "checkpoints" / "final.ckpt").read_bytes()
    (ws / "empty.ckpt").write_bytes(b"")
    (ws / "random.ckpt").write_bytes(os.urandom(4096))
    (ws / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    torch.save({"weights": torch.zeros(3)}, ws / "foreign.ckpt")  # loads, but is not ours
    torch.save({"obj": Path("x")}, ws / "pickle.ckpt")  # needs unpickling an arbitrary class
    (ws / "broken.yaml").write_text("ppo: {lr: [0.1\n  num_envs: :\n")
    (ws / "list.yaml").write_text("- 1\n- 2\n")
    (ws / "unknown.yaml").write_text("bogus_key: 1\n")
    (ws / "afile").write_text("not a folder\n")


#: config/checkpoint cases per command run as their own ``compo`` process; the rest of that
#: command's run in one Python process (module docstring)
PROCESS_PER_COMMAND = 3

#: run by ``python -c`` with a JSON list of (argv, cwd): each case through ``main`` in its own
#: working folder, its stderr and exit code back as JSON on stdout
_IN_PROCESS = """
import contextlib, io, json, os, sys
from experiments.cli import main
out = []
for argv, cwd in json.loads(sys.stdin.read()):
    os.chdir(cwd)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    out.append([code, err.getvalue()])
sys.__stdout__.write(json.dumps(out))
"""


def _heavy(argv: list[str]) -> bool:
    """The case loads a config or a checkpoint (imports torch and Lightning)."""
    return any(a in ("--set", "--config", "--checkpoint") for a in argv)


def _split(cases) -> tuple[list, dict[str, list]]:
    """(cases run as their own process, {command: cases run in one process})."""
    alone, batched, taken = [], {}, {}
    for case in cases:
        argv = case[1]
        if argv and _heavy(argv):
            cmd = argv[0]
            taken[cmd] = taken.get(cmd, 0) + 1
            if taken[cmd] > PROCESS_PER_COMMAND:
                batched.setdefault(cmd, []).append(case)
                continue
        alone.append(case)
    return alone, batched


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    """Every case, a few processes at a time (module docstring)."""
    ws = tmp_path_factory.mktemp("bad_input")
    _workspace(ws)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def prepare(case):
        name, argv, _ = case
        argv = [a.replace("{ws}", str(ws)) for a in argv]
        out = ws / "outs" / name
        cwd = ws / "cwd" / name
        cwd.mkdir(parents=True)
        if argv and "--out" not in argv and argv[0] in COMMANDS:
            argv += ["--out", str(out)]
        watched = Path(argv[argv.index("--out") + 1]) if "--out" in argv else out
        return argv, cwd, watched, _snapshot(watched)

    def result(watched, before, cwd, code, err):
        written = _snapshot(watched) != before or any(cwd.iterdir())
        return code, err, written

    def run(case):
        argv, cwd, watched, before = prepare(case)
        try:
            proc = subprocess.run(
                [*_compo(), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                timeout=TIMEOUT,
            )  # fmt: skip
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:  # it started working on the bad input
            code, err = None, f"still running after {TIMEOUT} s: {e.stderr!r}"
        return {case[0]: result(watched, before, cwd, code, err)}

    def run_batch(cases):
        prepared = [prepare(c) for c in cases]
        payload = json.dumps([[argv, str(cwd)] for argv, cwd, _, _ in prepared])
        proc = subprocess.run(
            [sys.executable, "-c", _IN_PROCESS], input=payload, env=env, capture_output=True,
            text=True, timeout=TIMEOUT * len(cases),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout)
        return {
            c[0]: result(watched, before, cwd, code, err)
            for c, (_, cwd, watched, before), (code, err) in zip(cases, prepared, got)
        }

    alone, batched = _split(RUN_CASES)
    found: dict = {}
    with ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 1) + 1)) as pool:
        jobs = [pool.submit(run_batch, cs) for cs in batched.values()]
        jobs += [pool.submit(run, c) for c in alone]
        for job in jobs:
            found.update(job.result())
    return {"ws": str(ws), **found}


RUN_CASES = CASES


def test_enough_cases():
    assert len(CASES) >= 100
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1][0] for c in CASES if c[1]}
    assert commands >= {"train", "heldout", "trace", "graph", "ablate", "embed", "eval"}


@pytest.mark.parametrize("name, argv, needle", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_input_one_line_exit_2_nothing_written(outcomes, name, argv, needle):
    code, err, written = outcomes[name]
    needle = needle.replace("{ws}", outcomes["ws"])
    assert code == 2, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("compo"), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and "weights_only" not in err
    assert not written

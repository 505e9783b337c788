"""``fewstep search`` and fewstep.samplers.search: the search improves on its seeds, a resumed search
equals an uninterrupted one, the CLI on the digits teacher, a tiny SD pipeline folder and a
module:callable model, argument errors before torch, and the two-process sharded search."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fewstep.samplers.search import (
    STEP_FEATURES,
    SearchSettings,
    _Space,
    format_report,
    holdout_report,
    run_search,
    seed_schedules,
)
from fewstep.samplers.search_problem import mixture_problem
from fewstep.samplers.usf_schedule import USFSchedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TESTS = os.path.dirname(__file__)


def mixture_search_model():
    """The ``module:callable`` of the CLI tests: the exact 8-dimensional Gaussian mixture."""
    return mixture_problem(dim=8, seed=1)


def _settings(**kw):
    base = dict(nfe=3, population=6, batch=24, holdout=32, validate_top=3)
    return SearchSettings(**{**base, **kw})


def test_search_improves_on_its_seeds(tmp_path):
    problem = mixture_problem(dim=8, seed=1)
    res = run_search(problem, _settings(nfe=4), budget_evals=90, log_path=tmp_path / "log.json")
    seeds = [c for c in res.candidates if c["origin"].startswith("seed:")]
    assert len(seeds) >= 12 and all(c["generation"] == 0 for c in seeds)  # identical exports counted once
    best_seed = min(c["score"] for c in seeds if c["score"] is not None)
    assert res.best_score < 0.95 * best_seed  # measured 0.87x; a search that only re-evaluates seeds fails
    chosen = next(c for c in res.candidates if c["id"] == res.best.info["search"]["candidate"])
    assert chosen["origin"] in ("mutation", "crossover") and "validation" in chosen
    assert res.best.nfe == 4 and res.best.info["model"] == problem.name
    # every logged candidate is a valid schedule with the search's NFE, none twice
    keys = [USFSchedule.from_dict(c["schedule"]).key() for c in res.candidates]
    assert len(set(keys)) == len(keys)
    assert all(USFSchedule.from_dict(c["schedule"]).nfe == 4 for c in res.candidates)
    report = holdout_report(problem, {"usf": res.best}, _settings(nfe=4), diffusers_rows=False)
    assert report["seed"] != 0 and report["rows"]["usf"]["rmse"] is not None
    assert "usf" in format_report(report) and report["best_handset"] in report["rows"]


def test_resume_equals_uninterrupted(tmp_path):
    problem = mixture_problem(dim=8, seed=1)
    settings = _settings(predictor=True, min_train=10, pool=3)
    whole = run_search(problem, settings, budget_evals=70, log_path=tmp_path / "a.json")
    run_search(problem, settings, budget_evals=70, log_path=tmp_path / "b.json", stop_after_generations=2)
    interrupted = json.loads((tmp_path / "b.json").read_text())
    assert len(interrupted["candidates"]) < len(whole.candidates) and "chosen" not in interrupted
    resumed = run_search(problem, settings, budget_evals=70, log_path=tmp_path / "b.json", resume=True)

    def strip(cands):
        return [{k: v for k, v in c.items() if k != "seconds"} for c in cands]

    assert strip(resumed.candidates) == strip(whole.candidates)
    assert any("predicted" in c for c in whole.candidates)  # the predictor ranked proposals
    assert resumed.best.to_dict()["steps"] == whole.best.to_dict()["steps"]
    with pytest.raises(ValueError, match="resume"):
        run_search(problem, settings, budget_evals=70, log_path=tmp_path / "b.json")
    with pytest.raises(ValueError, match="other settings"):
        run_search(problem, _settings(batch=25), budget_evals=70, log_path=tmp_path / "b.json", resume=True)


def test_extra_seed_schedules_join_generation_zero(tmp_path):
    """``seeds=``: a user schedule (here: a previous search's best) is scored with the hand-set seeds,
    so the search can only end at or below it; a seed of another NFE is refused by name."""
    problem = mixture_problem(dim=8, seed=1)
    first = run_search(problem, _settings(), budget_evals=40, log_path=tmp_path / "a.json")
    res = run_search(problem, _settings(), budget_evals=30, log_path=tmp_path / "b.json",
                     seeds=[("previous best", first.best)])
    mine = [c for c in res.candidates if c["origin"] == "seed:previous best"]
    assert len(mine) == 1 and mine[0]["generation"] == 0 and mine[0]["score"] is not None
    assert USFSchedule.from_dict(mine[0]["schedule"]).key() == first.best.key()
    assert res.best_score <= mine[0]["score"]
    four = run_search(problem, _settings(nfe=4), budget_evals=10, log_path=tmp_path / "c.json").best
    with pytest.raises(ValueError, match="'four' .*nfe=3"):
        run_search(problem, _settings(), budget_evals=10, seeds=[("four", four)])


def test_seeds_cover_the_hand_set_schedulers_and_mutations_stay_valid():
    import numpy as np

    from fewstep.samplers.search_problem import digits_problem

    problem = digits_problem(1.0)
    settings = SearchSettings(nfe=5)
    seeds = dict(seed_schedules(problem, settings))
    assert {"ddim trailing", "dpmpp-2m trailing", "dpmpp-3m power1.3", "dpmpp-3s trailing", "v3-o2 trailing",
            "unipc-like-2m trailing", "dpmpp-2m trailing afs-mean_x0"} <= set(seeds)
    assert all(s.nfe == 5 for s in seeds.values())
    assert seeds["v3-o2 trailing"].ems["name"] == "digits"
    space = _Space(problem, settings)
    rng = np.random.default_rng(0)
    pool = list(seeds.values())
    for _ in range(200):
        child = space.normalize(space.mutate(pool[int(rng.integers(len(pool)))], rng))
        if child is not None:
            assert child.nfe == 5
            USFSchedule.from_dict(child.to_dict())
            pool.append(child)
    assert len(pool) > 150
    assert len({s.key() for s in pool}) > 100
    assert any(s.afs != "none" for s in pool) and any(s.uses_v3 for s in pool)
    feats = np.stack([space.features(s) for s in pool])
    assert feats.shape == (len(pool), 4 + 6 * STEP_FEATURES) and np.isfinite(feats).all()


def test_cli_on_a_callable_model(tmp_path, capsys):
    from fewstep.apps.cli import main

    out = tmp_path / "best.json"
    args = ["search", "--model", "test_usf_search:mixture_search_model", "--nfe", "3", "--out", str(out),
            "--budget", "20", "--population", "4", "--batch", "16", "--holdout", "16", "--quiet"]
    sys.path.insert(0, TESTS)
    try:
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert '"evaluations":' in printed and "held-out noise" in printed
        best = USFSchedule.load(out)
        assert best.nfe == 3 and "holdout" in best.info
        assert main(args) == 2  # the log exists: refused without --resume
        assert "--resume" in capsys.readouterr().err
        assert main(args + ["--resume", "--budget", "30"]) == 0
        log = json.loads((tmp_path / "best.json.log.json").read_text())
        assert len(log["candidates"]) >= 30
        again = [*args[:6], str(tmp_path / "again.json"), *args[7:], "--seed-schedule", str(out), "--holdout", "0"]
        assert main(again) == 0
        log = json.loads((tmp_path / "again.json.log.json").read_text())
        assert [c["generation"] for c in log["candidates"] if c["origin"] == f"seed:file:{out}"] == [0]
    finally:
        sys.path.remove(TESTS)


def test_cli_on_a_tiny_sd_pipeline_folder(tmp_path, capsys):
    from tiny_pipelines import tiny_sd

    from fewstep.apps.cli import main

    folder = tmp_path / "sd"
    tiny_sd().save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n")
    out = tmp_path / "sd_nfe3.json"
    args = ["search", "--model", str(folder), "--prompts", str(prompts), "--guidance-scale", "3", "--nfe", "3",
            "--out", str(out), "--budget", "8", "--population", "4", "--batch", "2", "--reference-steps", "20",
            "--holdout", "2", "--validate-top", "2", "--quiet"]
    assert main(args) == 0
    best = USFSchedule.load(out)
    assert best.nfe == 3 and best.info["guidance_scale"] == 3.0 and not best.uses_v3
    assert main(["search", "--model", str(folder), "--nfe", "3", "--out", str(tmp_path / "x.json")]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_cli_argument_errors_come_before_torch(tmp_path):
    code = (
        "import sys\n"
        "import fewstep\n"
        "before = set(sys.modules)\n"
        "from fewstep.apps import cmd_search\n"
        "import argparse\n"
        "p = argparse.ArgumentParser(); sub = p.add_subparsers(); cmd_search.register(sub)\n"
        "for argv, msg in [(['search', '--nfe', '1', '--out', 'x.json'], '--nfe 1'),\n"
        "                  (['search', '--nfe', '5', '--out', 'x.json', '--budget', '5x'], '--budget'),\n"
        "                  (['search', '--nfe', '5', '--out', 'x.json', '--model', 'nowhere'], 'neither'),\n"
        "                  (['search', '--nfe', '5', '--out', 'x.json', '--proxy', 'fd', '--model', '.'],\n"
        "                   'FD-digits'),\n"
        "                  (['search', '--nfe', '5', '--out', 'x.json', '--seed-schedule', 'none.json'],\n"
        "                   'neither a file nor a shipped name')]:\n"
        "    try:\n"
        "        p.parse_args(argv).func(p.parse_args(argv))\n"
        "    except (ValueError, FileNotFoundError) as err:\n"
        "        assert msg in str(err), (msg, err)\n"
        "    else:\n"
        "        raise SystemExit('no error for %s' % argv)\n"
        "heavy = [m for m in set(sys.modules) - before if m.split('.')[0] in ('torch', 'diffusers', 'sklearn')\n"
        "         or m.startswith('fewstep.samplers.search')]\n"
        "assert not heavy, 'imported before the argument checks: %s' % sorted(heavy)[:5]\n"
        "assert cmd_search.parse_budget('20m') == (None, 20.0) and cmd_search.parse_budget('300') == (300, None)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(),
                                                                                        os.environ.get("PYTHONPATH")]))))
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
def test_two_process_search_equals_single(tmp_path):
    """``accelerate launch`` with two CPU processes scores each generation's candidates round-robin;
    the log equals the single-process one (same candidates, scores to float rounding) and the
    launch exits cleanly."""
    common = ["search", "--model", "test_usf_search:mixture_search_model", "--nfe", "3", "--budget", "24",
              "--population", "6", "--batch", "16", "--holdout", "0", "--validate-top", "0", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.getcwd(), os.environ.get("PYTHONPATH")])))
    from test_ems import _free_port  # the rendezvous port helper of the EMS sharding test

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "fewstep.apps.cli", *common, "--device", "cpu",
           "--out", str(tmp_path / "two.json")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"world_size": 2' in res.stdout
    one = subprocess.run([sys.executable, "-m", "fewstep.apps.cli", *common, "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = json.loads((tmp_path / "two.json.log.json").read_text())["candidates"]
    single = json.loads((tmp_path / "one.json.log.json").read_text())["candidates"]
    assert [c["schedule"] for c in two] == [c["schedule"] for c in single]
    for a, b in zip(two, single):
        assert (a["score"] is None) == (b["score"] is None)
        if a["score"] is not None:
            assert a["score"] == pytest.approx(b["score"], rel=1e-9)

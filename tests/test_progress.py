"""Progress lines (rate and time left, at most every EVERY_S seconds, from every long
phase) and the plan printed before a run."""

from __future__ import annotations

import logging
import re

import pytest

from mct_ray import plan, progress
from mct_ray.evaluate import evaluate
from mct_ray.experts import train_expert
from mct_ray.progress import Progress, duration

pytestmark = pytest.mark.core


def test_duration_reads_as_a_person_would():
    assert [duration(s) for s in (0, 44.6, 200, 7500)] == ["0 s", "45 s", "3 min 20 s",
                                                             "2 h 05 min"]


def test_a_line_says_the_share_done_the_rate_and_the_time_left(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 10.0, 10.0, 20.0, 20.0, 20.0])  # start; per line: check, mark, rate
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, "mct_ray.progress")
    p = Progress("expert 3", 400, unit="images", every_s=5, detail=lambda: "epoch 1/4")
    p.update(100)  # t = 10 s: 100 images in 10 s, 300 left
    p.update(100)  # t = 20 s
    assert [r.getMessage() for r in caplog.records] == [
        "expert 3: 25 % of 400 images (epoch 1/4), 10 images/s, about 30 s left",
        "expert 3: 50 % of 400 images (epoch 1/4), 10 images/s, about 20 s left"]


def test_lines_are_throttled(caplog):
    caplog.set_level(logging.INFO, "mct_ray.progress")
    p = Progress("distill", 1000, every_s=3600)
    for _ in range(1000):
        p.update()
    assert not caplog.records


def test_experts_and_evaluations_report_progress(tiny_ctx, caplog, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    caplog.set_level(logging.INFO, "mct_ray.progress")
    c = tiny_ctx
    train_expert(c.net, c.data, c.cfg.expert_training, c.aug, 0, 0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(re.fullmatch(r"expert 0: \d+ % of [\d,]+ images \(epoch \d/4\), "
                                      r"[\d,.]+ images/s, about .* left", m) for m in lines)
    assert lines[-1].startswith("expert 0: 100 % ") and "epoch 4/4" in lines[-1]
    caplog.clear()
    from mct_ray.evaluate import random_real
    evaluate(c.cfg, c.net, c.data, random_real(c.cfg, c.data))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == c.cfg.eval.num_eval * c.cfg.eval.epochs
    assert lines[-1].startswith("evaluation of iteration 0 on convnet: 100 % of 3 epochs")


def test_the_plan_names_every_phase_with_a_time(tiny_ctx):
    p = plan.estimate(tiny_ctx, ("experts", "distill"), num_missing_experts=2)
    assert set(p.seconds) == {"experts", "distillation", "evaluations"}
    assert all(0 < s < 60 for s in p.seconds.values())
    text = p.describe()
    assert "experts: 2 to train of 2, 4 epochs each" in text
    assert "4 iterations of 3 student steps on 10 synthetic images" in text
    assert "4 points (every 2 iterations and the random-real baseline) x 1 networks x 3 " \
        "epochs" in text
    assert "rough time on this machine" in text
    assert set(plan.estimate(tiny_ctx, ("experts",), 0).seconds) == set()


def test_the_closing_lines_say_where_to_look():
    text = plan.where_to_look("runs/x", ("experts", "distill"))
    for name in ("outputs in runs/x", "synthetic.png", "curve.png", "summary.json",
                 "tensorboard --logdir runs/x/tb"):
        assert name in text
    assert "mct-ray distill" in plan.where_to_look("runs/x", ("experts",))


def test_a_wait_for_evaluations_that_cannot_run_is_never_silent(caplog, monkeypatch):
    from mct_ray.evaluate import EvalResult
    from mct_ray.loop import Evaluations

    class Stuck:  # an evaluation with no room to run: done only after a while
        def __init__(self):
            self.polls = 0

        def done(self):
            self.polls += 1
            return self.polls > 3

        def result(self):
            return EvalResult((0.5,))

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    caplog.set_level(logging.INFO, "mct_ray.loop")
    evals = Evaluations(lambda syn, tag, model: Stuck(), (None,))
    evals.submit(_pending(100))
    done = evals.wait_all()
    assert [p.iteration for p, _, _ in done] == [100]
    assert any("waiting" in r.getMessage() and "1 evaluations of iterations [100]" in
               r.getMessage() for r in caplog.records)


def _pending(iteration):
    import torch

    from mct_ray.records import PendingEval
    from mct_ray.synthetic import SyntheticSet
    return PendingEval(SyntheticSet(torch.zeros(1, 1, 2, 2), torch.zeros(1), 0.01,
                                    {"iteration": iteration}), 0.0, 0.0)

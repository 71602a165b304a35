"""Soft labels: the MCT authors' teacher labels (`distill.labels=teacher`), the student and
the evaluation networks training on them, and the files that carry them; DATM's window of
start epochs (`distill.start_window`) and its filter of starting images
(`distill.init_filter=correct`); DATM's learned labels (`distill.labels=learned`), their
gradient against finite differences.

The teacher labels are checked against the authors' definition written here (the softmax of
the sampled expert's network at max_start_epoch of its compressed path, on the synthetic
images as they are), with the path and the network's forward computed independently in
float64.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mct_ray import formats
from mct_ray.augment import Augmenter
from mct_ray.cli import main
from mct_ray.config import AugmentConfig, ExpertConfig, load_config
from mct_ray.distill import Distiller, plan_unroll
from mct_ray.errors import FormatError
from mct_ray.evaluate import evaluate
from mct_ray.experts import anchor_points, smoothing_epochs
from mct_ray.nets import Network
from mct_ray.rng import generator
from mct_ray.synthetic import SyntheticSet
from mct_ray.training import train_epoch
from mct_ray.trajectory import ConvexTrajectory, beta_from_step_norms, flatten, unflatten
from tests.conftest import TINY
from tests.test_authors_mct import SPEC, authors_compress, authors_point, random_checkpoints

pytestmark = pytest.mark.core

ANCHORS = (3, 6, 9)


def convex64(checkpoints) -> ConvexTrajectory:
    """The compressed path of these checkpoints, kept in float64."""
    cfg = ExpertConfig(epochs=len(checkpoints) - 1, anchors=ANCHORS, smooth_anchors=True)
    flat = [flatten(c) for c in checkpoints]
    norms = torch.tensor([[float(torch.norm(b - a)) for a, b in zip(c0, c1)]
                          for c0, c1 in zip(checkpoints[:-1], checkpoints[1:])],
                         dtype=torch.float64)
    return ConvexTrajectory(SPEC, (0, *ANCHORS, len(checkpoints) - 1),
                            anchor_points(cfg, {e: flat[e] for e in smoothing_epochs(cfg)}),
                            beta_from_step_norms(norms))


def convnet(params, x, spec=SPEC):
    """A one-block ConvNet from its definition: conv3x3 (padding as the first layer's),
    instance norm with affine parameters, ReLU, 2x2 average pooling, linear classifier."""
    w, b, nw, nb, cw, cb = params
    x = F.conv2d(x, w, b, padding=spec.first_padding)
    mean = x.mean((2, 3), keepdim=True)
    var = x.var((2, 3), unbiased=False, keepdim=True)
    x = (x - mean) / torch.sqrt(var + 1e-5) * nw[None, :, None, None] + nb[None, :, None, None]
    x = F.avg_pool2d(F.relu(x), 2)
    return x.flatten(1) @ cw.T + cb


def teacher_case(overrides=()):
    checkpoints = [random_checkpoints(10, s) for s in (0, 1)]
    cfg = load_config("fashion-mnist-ipc1", ["distill.labels=teacher",
                                             "distill.max_start_epoch=4.5",
                                             "distill.expert_epochs=2", "distill.syn_steps=3",
                                             "distill.grad_mode=unroll", *overrides]).distill
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    aug = Augmenter(AugmentConfig(enabled=True, mode="all"))
    distiller = Distiller(Network(SPEC), [convex64(c) for c in checkpoints], images, classes,
                          cfg, aug, seed=3)
    return checkpoints, distiller, images


def test_teacher_labels_are_the_sampled_experts_softmax_at_max_start():
    checkpoints, distiller, images = teacher_case()
    k = int(torch.randint(2, (1,), generator=generator(3, "distill", 0)))  # its first draw
    distiller.step()
    points, steps = authors_compress(checkpoints[k], [0, *ANCHORS, 10])
    expected = torch.softmax(convnet(authors_point(points, steps, [0, *ANCHORS, 10], 4.5),
                                     images), dim=1)
    assert distiller.labels.dtype == torch.float64 and distiller.labels.shape == (6, 3)
    torch.testing.assert_close(distiller.labels, expected, rtol=1e-10, atol=1e-12)
    assert float((expected - F.one_hot(distiller.classes, 3)).abs().max()) > 0.1  # soft
    assert torch.equal(distiller.student.labels, distiller.labels)


def test_the_student_steps_on_the_soft_cross_entropy():
    """The student's loss with teacher labels is -sum_c t_c log softmax_c, averaged over
    the minibatch (what the authors' nn.CrossEntropyLoss computes on soft targets)."""
    _, distiller, images = teacher_case()
    distiller.step()
    plan = plan_unroll(6, 4, 1, 8, distiller.aug, torch.Generator().manual_seed(0))[0]
    params = [p.double() for p in SPEC.init_params(torch.Generator().manual_seed(1))]
    ours = distiller.student.loss(params, images, plan)
    x = distiller.aug.apply(images[plan.indices], plan.aug)
    t = distiller.labels[plan.indices]
    by_hand = -(t * torch.log_softmax(convnet(params, x), dim=1)).sum(1).mean()
    torch.testing.assert_close(ours, by_hand, rtol=1e-10, atol=1e-12)


def test_evaluation_networks_train_on_the_soft_targets():
    """One epoch of the evaluation's training on soft labels equals SGD on the soft
    cross-entropy done by hand, batch by batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.softmax(torch.randn(6, 3, generator=gen, dtype=torch.float64), dim=1)
    params = [p.double() for p in SPEC.init_params(torch.Generator().manual_seed(1))]
    net = SPEC.module([p.clone() for p in params], "builtin").double().requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    no_aug = Augmenter(AugmentConfig(enabled=False))
    train_epoch(net, opt, x, t, 4, no_aug, torch.Generator().manual_seed(5))
    by_hand = [p.clone().requires_grad_(True) for p in params]
    for idx in torch.randperm(6, generator=torch.Generator().manual_seed(5)).split(4):
        loss = -(t[idx] * torch.log_softmax(convnet(by_hand, x[idx]), dim=1)).sum(1).mean()
        grads = torch.autograd.grad(loss, by_hand)
        by_hand = [(p - 0.1 * g).detach().requires_grad_(True) for p, g in zip(by_hand, grads)]
    for ours, theirs in zip(net.parameters(), by_hand):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-12)


def soft_set(n=6, k=3) -> SyntheticSet:
    gen = torch.Generator().manual_seed(0)
    return SyntheticSet(torch.randn(n, 1, 8, 8, generator=gen),
                        torch.softmax(torch.randn(n, k, generator=gen), 1), 0.01,
                        {"iteration": 4, "labels": "teacher"},
                        torch.arange(k).repeat_interleave(n // k))


def test_a_soft_label_set_round_trips_through_files():
    syn = soft_set()
    back = formats.load_synthetic(formats.save_synthetic(syn, SPEC), "s", SPEC)
    assert back.soft and torch.equal(back.labels, syn.labels)
    assert torch.equal(back.classes, syn.classes) and back.info["labels"] == "teacher"
    assert torch.equal(back.hard().labels, syn.classes) and not back.hard().soft


@pytest.mark.parametrize("bad", ["nan", "not-a-distribution", "no-classes", "class-count",
                                 "negative-class"])
def test_bad_soft_labels_are_refused_in_one_line(bad):
    syn = soft_set()
    tensors = {"images": syn.images, "labels": syn.labels.clone(), "classes": syn.classes}
    spec = SPEC
    if bad == "nan":
        tensors["labels"][0, 0] = float("nan")
    elif bad == "not-a-distribution":
        tensors["labels"] *= 2
    elif bad == "no-classes":
        del tensors["classes"]
    elif bad == "class-count":
        from dataclasses import replace

        spec = replace(SPEC, num_classes=4)
    else:
        tensors["classes"] = syn.classes - 1
    data = formats.pack(formats.SYNTHETIC, tensors,
                        {"net": spec.describe(), "step_size": 0.01, "info": {}})
    with pytest.raises(FormatError) as err:
        formats.load_synthetic(data, "bad.safetensors", spec)
    assert "\n" not in str(err.value) and str(err.value).startswith("bad.safetensors: ")


def test_a_teacher_label_run_scores_hard_labels_beside_and_eval_reads_its_labels(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--local", "--out", str(out), *TINY, "distill.labels=teacher"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == "teacher"
    assert 0 <= summary["hard_label_acc_mean"] <= 1
    best = formats.load_synthetic((out / "synthetic.safetensors").read_bytes(), "s")
    if best.iteration == 0:  # the starting images, hard labels: the two scores are one
        assert summary["hard_label_acc_mean"] == summary["best_acc_mean"]
    last = formats.load_synthetic((out / "last.safetensors").read_bytes(), "s")
    assert last.info["labels"] == "teacher" and last.soft
    assert main(["eval", "--local", "--out", str(tmp_path / "e"), "--synthetic",
                 str(out / "last.safetensors"), *TINY]) == 0
    scored = json.loads((tmp_path / "e" / "eval.json").read_text())
    from mct_ray.context import Context

    ctx = Context.build(load_config("digits", [*TINY, "distill.labels=teacher"]))
    assert scored["accs"] == list(evaluate(ctx.cfg, ctx.net, ctx.data, last, "final").accs)
    assert scored["labels"] == "soft"


def resumed_and_whole(tmp_path, *overrides: str):
    """A run of TINY with `overrides`, and the same distillation stopped at iteration 2 and
    resumed: their last sets, and the whole run's folder."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = [*TINY, *overrides]
    assert main(["run", "--local", "--out", str(whole), *args]) == 0
    half = [a for a in args if not a.startswith("distill.iterations")]
    assert main(["distill", "--local", "--out", str(part), "--experts", str(whole), *half,
                 "distill.iterations=2"]) == 0
    assert main(["distill", "--local", "--out", str(part), "--experts", str(whole),
                 "--resume", *args]) == 0
    load = lambda p: formats.load_synthetic((p / "last.safetensors").read_bytes(), "s")  # noqa
    return load(whole), load(part), whole


def test_a_resumed_teacher_label_run_ends_as_the_uninterrupted_one(tmp_path):
    a, b, _ = resumed_and_whole(tmp_path, "distill.labels=teacher")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.soft


# ---------------------------------------------------------------------------------------
# DATM's difficulty-aligned window of start epochs.

def datm_upper(it: int, initial: float, final: float, iterations: float) -> float:
    """DATM.py's bound: min(current_max + int((max - current_max) * it / expansion_end), max)."""
    return min(initial + int((final - initial) * it / iterations), final)


@pytest.mark.parametrize("method", ["mct", "mtt"])
def test_the_start_window_grows_as_datms(method):
    from mct_ray.config import start_bounds
    from mct_ray.distill import sample_segment

    cfg = load_config("digits", [f"distill.method={method}", "distill.max_start_epoch=20",
                                 "distill.start_window=[2,5,100]",
                                 "distill.expert_epochs=2"]).distill
    for it in (0, 1, 7, 50, 99, 100, 101, 5000):
        assert start_bounds(cfg, it) == (2, datm_upper(it, 5, 20, 100))
    trajs = [convex64(random_checkpoints(30, s)) for s in (0, 1)]
    for it in (0, 40, 200):
        low, high = 2, datm_upper(it, 5, 20, 100)
        starts = [sample_segment(trajs, cfg, generator(0, "w", i), "cpu", it).start_epoch
                  for i in range(300)]
        assert low <= min(starts) and max(starts) < high
        assert max(starts) > high - 1.5 and min(starts) < low + 1  # the whole window is used
        if method == "mtt":
            assert all(s == int(s) for s in starts) and set(starts) == set(range(low, high))


def test_without_a_window_the_draws_are_todays():
    """No window: the same (start, target) as before the window existed, bit for bit."""
    from mct_ray.distill import sample_segment

    trajs = [convex64(random_checkpoints(10, s)) for s in (0, 1)]
    for method in ("mct", "mtt"):
        cfg = load_config("digits", [f"distill.method={method}", "distill.max_start_epoch=5",
                                     "distill.expert_epochs=2"]).distill
        for i in range(20):
            gen = generator(0, "t", i)
            k = int(torch.randint(2, (1,), generator=gen))
            c = float(torch.rand((), generator=gen, dtype=torch.float64)) * 5 \
                if method == "mct" else float(torch.randint(5, (1,), generator=gen))
            seg = sample_segment(trajs, cfg, generator(0, "t", i), "cpu", 1000)
            assert (seg.expert, seg.start_epoch) == (k, c)


@pytest.mark.parametrize("window", ["[5,2,100]", "[0,30,100]", "[0,5]", "[0,5,0]",
                                    "[0,2.5,10]", "[a,2,3]"])
def test_a_bad_start_window_is_one_line(window):
    from mct_ray.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config("digits", ["distill.method=mtt", "distill.max_start_epoch=20",
                               f"distill.start_window={window}"])
    assert "distill.start_window" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------
# DATM's filter of starting images.

def test_the_correct_filter_keeps_the_first_images_the_first_expert_gets_right(tiny_ctx,
                                                                               tiny_experts):
    import dataclasses

    from mct_ray import starting

    cfg = tiny_ctx.cfg.replace(**{"distill.init_filter": "correct", "distill.ipc": 3})
    ctx = dataclasses.replace(tiny_ctx, cfg=cfg)
    trajs = [e.convex for e in tiny_experts]
    chosen = starting.resolve(ctx, trajs)
    ends = [unflatten(ctx.spec, t.point(t.num_epochs)) for t in trajs]
    x, y = ctx.data.train_x, ctx.data.train_y
    gen, expected, by_first = generator(cfg.seed, "init"), [], 0
    for c in range(ctx.data.num_classes):  # all of a class at once: chunking is not the rule
        idx = torch.nonzero(y == c).flatten()
        order = idx[torch.randperm(len(idx), generator=gen)]
        picked: list[int] = []
        for end in ends:  # the first expert's hits, then the second's, then the next images
            right = order[convnet(end, x[order], ctx.spec).argmax(1) == c].tolist()
            picked += [i for i in right if i not in picked][:3 - len(picked)]
        picked += [i for i in order.tolist() if i not in picked][:3 - len(picked)]
        by_first += len(picked) == 3 and all(
            int(convnet(ends[0], x[[i]], ctx.spec).argmax()) == c for i in picked)
        expected += picked
    assert chosen.tolist() == expected
    assert by_first >= 5  # most classes decided by the first expert alone
    unfiltered = starting.resolve(dataclasses.replace(
        tiny_ctx, cfg=tiny_ctx.cfg.replace(**{"distill.ipc": 3})), trajs)
    assert chosen.tolist() != unfiltered.tolist()  # the filter changed the draw


def test_the_filter_goes_on_with_the_next_expert_then_the_next_images():
    from mct_ray.synthetic import draw_correct_indices

    y = torch.tensor([0] * 6 + [1] * 6)
    first = lambda i: torch.where(i % 2 == 0, y[i], 1 - y[i])  # noqa: E731  right on evens
    never = lambda i: 1 - y[i]  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    order = [torch.nonzero(y == c).flatten()[torch.randperm(6, generator=g)].tolist()
             for g in [gen()] for c in (0, 1)]
    got = draw_correct_indices(y, 2, 4, gen(), [never, first], batch=2).tolist()
    evens = [[i for i in o if i % 2 == 0] for o in order]
    assert got[:3] == evens[0] and got[4:7] == evens[1]  # the second network's hits
    assert got[3] == next(i for i in order[0] if i % 2)  # then the class's next image
    assert got[7] == next(i for i in order[1] if i % 2)


def test_a_filter_and_a_starting_file_together_are_refused():
    from mct_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="set one"):
        load_config("digits", ["distill.init_filter=correct", "distill.init_indices=x.json"])


# ---------------------------------------------------------------------------------------
# DATM's learned labels.

def learned_case(mode: str, steps: int = 3):
    checkpoints = [random_checkpoints(10, s) for s in (0, 1)]
    trajs = [convex64(c) for c in checkpoints]
    cfg = load_config("fashion-mnist-ipc1", ["distill.labels=learned",
                                             f"distill.grad_mode={mode}",
                                             f"distill.syn_steps={steps}",
                                             "distill.image_grad_scale=1"]).distill
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    aug = Augmenter(AugmentConfig(enabled=True, mode="all"))
    distiller = Distiller(Network(SPEC), trajs, images, classes, cfg, aug, seed=0)
    distiller.step_size = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    start = [p.double() for p in SPEC.init_params(torch.Generator().manual_seed(2))]
    target = [p + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
              for p in start]
    from mct_ray.distill import Segment

    seg = Segment(0, 0.0, 1.0, start, target)
    plans = plan_unroll(6, 4, steps, 8, aug, torch.Generator().manual_seed(4))
    return distiller, seg, plans, trajs, images, classes


def matching_loss_at(distiller, seg, plans, logits) -> float:
    """The matching loss after the unroll with labels softmax(logits), computed afresh."""
    from mct_ray.distill import Student, match_loss

    student = Student(Network(SPEC), torch.softmax(logits, 1), distiller.aug)
    final = student.run([p.clone() for p in seg.start], distiller.images.detach(),
                        distiller.step_size.detach(), plans, keep_graph=False)
    return float(match_loss(final, seg))


def test_the_learned_labels_gradient_through_the_unroll_is_the_finite_difference():
    distiller, seg, plans, *_ = learned_case("unroll")
    distiller.compute_grads(seg, plans)
    grad, z = distiller.label_logits.grad, distiller.label_logits.detach()
    assert grad is not None and float(grad.abs().max()) > 1e-8
    h = 1e-6
    for i, k in [(0, 0), (1, 2), (3, 1), (5, 0), (4, 2)]:
        e = torch.zeros_like(z)
        e[i, k] = h
        fd = (matching_loss_at(distiller, seg, plans, z + e)
              - matching_loss_at(distiller, seg, plans, z - e)) / (2 * h)
        assert abs(float(grad[i, k]) - fd) <= 1e-6 * max(1.0, abs(fd)), (i, k, fd)


def test_checkpoint_and_tesla_give_the_learned_labels_their_gradients():
    """checkpoint: the unroll's value; tesla: exact for one step, TESLA's approximation
    (each step's parameters held constant) beyond."""
    grads = {}
    for mode, steps in (("unroll", 3), ("checkpoint", 3), ("unroll", 1), ("tesla", 1)):
        distiller, seg, plans, *_ = learned_case(mode, steps)
        distiller.compute_grads(seg, plans)
        grads[(mode, steps)] = distiller.label_logits.grad
    torch.testing.assert_close(grads[("checkpoint", 3)], grads[("unroll", 3)],
                               rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(grads[("tesla", 1)], grads[("unroll", 1)],
                               rtol=1e-9, atol=1e-13)


def test_learned_labels_start_from_the_experts_that_get_each_image_right():
    distiller, _, _, trajs, images, classes = learned_case("unroll")
    ends = [unflatten(SPEC, t.point(t.num_epochs)) for t in trajs]
    logits = torch.stack([convnet(e, images) for e in ends])  # (experts, images, classes)
    right = logits.argmax(2) == classes
    for i in range(len(images)):
        rows = logits[right[:, i], i] if right[:, i].any() else logits[:, i]
        torch.testing.assert_close(distiller.label_logits[i].detach(), rows.mean(0),
                                   rtol=1e-10, atol=1e-12)
    before = distiller.label_logits.detach().clone()
    distiller.step()
    assert not torch.equal(distiller.label_logits.detach(), before)  # they are learned
    torch.testing.assert_close(distiller.snapshot().labels,
                               torch.softmax(distiller.label_logits.detach(), 1))


def test_a_resumed_learned_label_run_ends_as_the_uninterrupted_one(tmp_path):
    a, b, whole = resumed_and_whole(tmp_path, "distill.labels=learned",
                                    "distill.init_filter=correct",
                                    "distill.start_window=[0,1,3]")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.soft
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["labels"] == "learned" and summary["hard_label_acc_mean"] is not None

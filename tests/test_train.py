"""bigkernels.train.fit and helpers: AMP, gradient accumulation, clipping, schedulers, evaluation,
checkpoints that resume bit-for-bit, the metrics log; distillation and fine-tuning helpers."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bigkernels import train


# Tiny models: see the one_thread fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int = 48, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _run(model=None, **kwargs):
    model = model or _model()
    optimizer = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = dict(batch_size=4, max_steps=6, loss_fn=F.cross_entropy)
    args.update(kwargs)
    result = train.fit(model, optimizer, _dataset(), **args)
    return model, optimizer, result


def test_fit_learns_and_evaluates(tmp_path):
    model, _, result = _run(max_steps=None, epochs=4, eval_data=_dataset(32, seed=1), eval_every=10,
                            log_path=tmp_path / "log.jsonl", log_every=5)
    assert result.step == 4 * 12 and result.epoch == 3
    assert [e["step"] for e in result.evals] == [10, 20, 30, 40, 48]
    assert result.evals[-1]["eval_accuracy"] >= 0.85
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 48]
    assert {"epoch", "lr", "samples_per_s", "elapsed_s"} <= set(train_rows[0])
    assert len([r for r in records if "eval_loss" in r]) == 5
    assert model.training


def test_accumulation_matches_one_big_batch():
    # 3 micro-batches of 4 with the loss averaged = one batch of 12: same data order (seeded by
    # epoch), same gradient up to float rounding.
    big, _, _ = _run(batch_size=12, max_steps=4)
    accumulated, _, _ = _run(batch_size=4, accumulation_steps=3, max_steps=4)
    for a, b in zip(accumulated.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_update_and_is_logged(tmp_path):
    start = _params(_model())
    model, _, _ = _run(optimizer=None, max_steps=1, max_grad_norm=1e-3, log_path=tmp_path / "l.jsonl", log_every=1,
                       model=None)
    sgd_plain = torch.optim.SGD  # lr 0.1, momentum: the first step moves by lr * clipped grad
    del sgd_plain
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    assert moved.norm().item() <= 0.1 * 1e-3 * 1.001
    record = json.loads((tmp_path / "l.jsonl").read_text().splitlines()[0])
    assert record["grad_norm"] > 1e-3  # the norm before clipping


def test_scheduler_steps_once_per_optimizer_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _run(model, optimizer=opt, scheduler=sched, max_steps=3, accumulation_steps=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


def test_bf16_autocast_on_cpu_trains():
    model, _, result = _run(precision="bf16", max_steps=12, eval_data=_dataset(32, seed=1))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.evals[-1]["eval_accuracy"] >= 0.7


def test_fp16_uses_a_grad_scaler_and_its_state_is_checkpointed(tmp_path):
    try:
        _, _, result = _run(precision="fp16", max_steps=2, checkpoint_dir=tmp_path)
    except RuntimeError as exc:  # older torch: no fp16 autocast / GradScaler on CPU
        pytest.skip(f"fp16 autocast on CPU unavailable here: {exc}")
    state = torch.load(result.checkpoint, weights_only=False)
    assert state["scaler"]["scale"] > 0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_is_bit_for_bit_the_uninterrupted_run(tmp_path, accumulation):
    # Dropout (global RNG), shuffling over several epochs, momentum, a scheduler: everything a
    # resumed run must restore. 48 samples / batch 4 = 12 batches an epoch; stopping at step 7
    # with accumulation 2 stops mid-epoch (batch 14 of 24 over two epochs).
    def run(directory, max_steps, resume):
        model = _model(dropout=0.3)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        torch.manual_seed(123)  # a resumed run must not depend on the state it starts in
        _, _, result = _run(model, optimizer=opt, scheduler=sched, max_steps=max_steps, accumulation_steps=accumulation,
                            checkpoint_dir=directory, checkpoint_every=5, resume=resume, log_path=directory / "log.jsonl",
                            log_every=1)
        return model, opt, result

    whole, whole_opt, _ = run(tmp_path / "whole", 15, False)
    run(tmp_path / "parts", 7, False)
    torch.manual_seed(999)
    resumed, resumed_opt, result = run(tmp_path / "parts", 15, True)
    assert result.step == 15
    for a, b in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(a, b)
    assert resumed_opt.param_groups[0]["lr"] == whole_opt.param_groups[0]["lr"]
    losses = lambda d: [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")  # same loss at every step, one log
    assert (tmp_path / "parts" / "step_00000005.pt").exists() and (tmp_path / "parts" / "latest.pt").exists()


def test_resume_true_without_a_checkpoint_starts_fresh(tmp_path):
    _, _, result = _run(max_steps=2, checkpoint_dir=tmp_path, resume=True)
    assert result.step == 2 and result.checkpoint == tmp_path / "step_00000002.pt"


def test_compile_opt_in_trains():
    # aot_eager: Dynamo and AOTAutograd trace forward and backward; Inductor's code generation
    # (the default backend) would add ~20 s of compilation on a 2-core CPU for no extra coverage.
    model, _, result = _run(max_steps=3, compile={"backend": "aot_eager"})
    assert result.step == 3 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"accumulation_steps": 0}, "accumulation_steps must be >= 1"),
        ({"epochs": 1}, "exactly one of max_steps and epochs"),
        ({"eval_every": 2}, "eval_every needs eval_data"),
        ({"checkpoint_every": 2}, "checkpoint_every needs checkpoint_dir"),
        ({"batch_size": 100}, "no full batch of 100"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _run(**kwargs)


def test_progress_line_on_request(capsys):
    _run(max_steps=2, progress=True, log_every=1)
    err = capsys.readouterr().err
    assert "step 2/2" in err and "samples/s" in err
    _run(max_steps=2)  # not a terminal: quiet
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ distillation
def test_distillation_loss_matches_its_definition():
    s, t = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    T, alpha = 3.0, 0.7
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    expected = alpha * kl + (1 - alpha) * F.cross_entropy(s, y)
    got = train.distillation_loss(s, t, y, temperature=T, alpha=alpha)
    torch.testing.assert_close(got, expected)
    assert train.distillation_loss(t, t, temperature=T).abs().item() < 1e-6  # student = teacher
    got.backward()
    assert s.grad is not None


def test_distillation_loss_bad_input():
    with pytest.raises(ValueError, match="teacher_logits must have"):
        train.distillation_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        train.distillation_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0)


def test_teacher_to_student_step_in_fit():
    teacher, _, _ = _run(max_steps=20)
    teacher_before = _params(teacher)
    student = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    step = train.distillation_step(teacher, temperature=2.0, alpha=0.5)
    result = train.fit(student, torch.optim.Adam(student.parameters(), lr=0.02), _dataset(), batch_size=8,
                       max_steps=30, compute_loss=step, eval_data=_dataset(32, seed=1))
    assert [e["step"] for e in result.evals] == [30]  # eval_loss there is the distillation loss
    accuracy = train.evaluate(student, _dataset(32, seed=1), batch_size=8, loss_fn=F.cross_entropy)["eval_accuracy"]
    assert accuracy >= 0.8
    for a, b in zip(teacher.parameters(), teacher_before):
        assert torch.equal(a, b), "the teacher must not train"


# ------------------------------------------------------------------------------ fine-tuning
def test_freeze_unfreeze_and_parameter_groups():
    model = _model()
    assert train.freeze(model, "0.*") == ["0.bias", "0.weight"]
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    groups = train.param_groups(model, {"*.bias": {"lr": 0.5}}, {"lr": 0.01})
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[0]["lr"] == 0.5
    assert groups[0]["params"][0] is model[3].bias
    train.unfreeze(model, ["0.weight"])
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    with pytest.raises(ValueError, match="matches no parameter"):
        train.freeze(model, "encoder.*")
    with pytest.raises(ValueError, match="matches no parameter"):
        train.param_groups(model, {"nothing.*": {"lr": 1.0}})
    opt = torch.optim.SGD(train.param_groups(model, {"0.*": {"lr": 0.0}}, {"lr": 0.1}))
    frozen_first = model[0].weight.detach().clone()
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen_first)  # its group has lr 0

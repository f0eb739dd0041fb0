"""DeepSpeed strategy: config completion and errors without processes, then ZeRO 1, 2 and 3 in fp32 and
bf16 on 2 real gloo processes compared with DDP (accumulation and clipping included).

The first DeepSpeed run on a machine compiles a C++ op (30 s to 3 min, then cached); the
`deepspeed_ops` fixture does it once, outside the ranks' timeouts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from distrib import distributed, prepare
from distrib.errors import PrepareError, TrainingError
from distrib.testing import run_ranks
from tests._support.models import (
    build_deepspeed_ops,
    changed_from_init,
    make_loader,
    make_model,
    max_difference,
    train,
)

# -- the config, no processes ----------------------------------------------------------------------


# -- real processes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed_ops() -> None:
    pytest.importorskip("deepspeed")
    build_deepspeed_ops()


def _error_checks() -> dict[str, str]:
    """Bad input inside a live DeepSpeed scope (each raises before any collective)."""
    found: dict[str, str] = {}
    with distributed(strategy="deepspeed", deepspeed={"zero_stage": 3}):
        with torch.device("meta"):
            meta_model = make_model()
        for name, call in {
            "meta": lambda: prepare(
                meta_model, torch.optim.SGD(meta_model.parameters(), lr=0.1), make_loader()
            ),
            "orphan_optimizer": lambda: prepare(torch.optim.SGD(make_model().parameters(), lr=0.1)),
        }.items():
            try:
                call()
            except PrepareError as exc:
                found[name] = str(exc)
    return found


def _zero_worker() -> dict[str, Any]:
    dist.init_process_group("gloo")
    try:
        out: dict[str, Any] = {"errors": _error_checks()}
        common = {"clip": 0.5, "gradient_accumulation_steps": 2}
        references = {
            mp: train("ddp", mixed_precision=mp, sgd=mp == "bf16", **common) for mp in ("no", "bf16")
        }
        for stage in (1, 2, 3):
            for mp in ("no", "bf16"):
                # bf16 runs gather the fp32 master weights, fp32 runs the module's (ZeRO-3: consolidated)
                options = {"zero_stage": stage, "gradient_clipping": 0.5, "save_16bit_model": mp == "no"}
                state, norms = train(
                    "deepspeed", mixed_precision=mp, deepspeed=options, sgd=mp == "bf16", **common
                )
                reference, reference_norms = references[mp]
                out[(stage, mp)] = (
                    state is None or max_difference(state, reference),
                    state is None or {v.dtype for v in state.values()},
                    norms,
                    reference_norms,
                )
        options = {"zero_stage": 3, "gradient_clipping": 0.5}
        state, _ = train("deepspeed", mixed_precision="bf16", deepspeed=options, sgd=True, **common)
        out["zero3_16bit"] = state is None or (
            max_difference(state, references["bf16"][0]),
            state["head.weight"].dtype,
        )
        # nothing configured: the loop's clip_grad_norm_(params, 0.5) sets DeepSpeed's clipping
        state, _ = train("deepspeed", deepspeed={"zero_stage": 2}, **common)
        out["adopted"] = state is None or max_difference(state, references["no"][0])
        try:
            train("deepspeed", clip=1.0, deepspeed={"zero_stage": 1, "gradient_clipping": 0.5})
        except TrainingError as exc:
            out["clip_error"] = str(exc)
        out["trained"] = {mp: ref is None or changed_from_init(ref) for mp, (ref, _) in references.items()}
        return out
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(900)  # the first DeepSpeed run on a machine compiles a C++ op first
def test_zero_stages_in_fp32_and_bf16_train_like_ddp_on_two_processes(deepspeed_ops: None):
    out = run_ranks(_zero_worker, 2, timeout=300)[0]
    assert "meta device" in out["errors"]["meta"] and "deepspeed.zero.Init" in out["errors"]["meta"]
    assert "same prepare() call" in out["errors"]["orphan_optimizer"]
    assert min(out["trained"].values()) > 3e-2  # the references moved: the comparisons are not vacuous
    for stage in (1, 2, 3):
        for mp, tolerance in (("no", 1e-5), ("bf16", 1e-2)):
            difference, dtypes, norms, reference_norms = out[(stage, mp)]
            assert difference < tolerance, f"ZeRO-{stage} {mp}: differs from DDP by {difference}"
            assert dtypes == {torch.float32}
            # DeepSpeed measures the norm inside step(): clip_grad_norm_ reports the previous step's
            assert norms[0] != norms[0]  # NaN before the first step
            assert norms[1:] == pytest.approx(reference_norms[:-1], rel=1e-4 if mp == "no" else 2e-2)
    difference, dtype = out["zero3_16bit"]
    assert dtype == torch.bfloat16 and difference < 2e-2
    assert out["adopted"] < 1e-5, "clip_grad_norm_ with no clipping configured clips like DDP"
    assert (
        "gradient_clipping=0.5" in out["clip_error"]
        and "DeepSpeedOptions(gradient_clipping=1.0)" in out["clip_error"]
    )

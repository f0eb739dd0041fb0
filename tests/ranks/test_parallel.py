"""N-D parallelism on real gloo processes, each layout against the same training in one process: tensor
parallel, FSDP2 x tensor parallel, pipelines with both schedules, checkpoints resharded between layouts,
a transformers Llama model under its built-in plan, and the data-parallel data path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from distrib.testing import run_ranks
from tests._support.parallel import PLAN, in_one_group, loss_fn, make_model, max_difference, moved, train

TOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """Two epochs in this process with no parallelism at all, at a global batch of 4."""
    return train(batch_size=4, epochs=2)


def _close(run: dict[str, Any], reference: dict[str, Any]) -> None:
    assert moved(reference["state"]) > 1e-2  # training did something to compare
    assert max_difference(run["state"], reference["state"]) < TOL
    assert max(abs(a - b) for a, b in zip(run["losses"], reference["losses"], strict=True)) < TOL


# -- tensor parallel -------------------------------------------------------------------------------------


def _tensor_parallel_worker() -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from distrib import distributed, prepare

    out = train(batch_size=4, epochs=2, parallelism={"tp": 2, "tp_plan": PLAN}, gradient_accumulation_steps=2)
    with distributed(parallelism={"tp": 2, "tp_plan": PLAN}) as ctx:
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters())  # built before, prepared in a later call
        model = prepare(model)
        optimizer = prepare(optimizer)
        ids = {id(p) for p in model.parameters()}
        out["late_optimizer"] = all(id(p) in ids for p in optimizer.param_groups[0]["params"])
        out["split"] = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
        out["local_up"] = tuple(model.blocks[0].up.weight.to_local().shape)
        out["mesh"] = (ctx.mesh.mesh_dim_names, tuple(ctx.mesh.shape), ctx.strategy)
    return out


def test_tensor_parallel_training_equals_one_process():
    reference = train(batch_size=4, epochs=2, gradient_accumulation_steps=2)
    results = run_ranks(in_one_group, 2, _tensor_parallel_worker, timeout=300)
    _close(results[0], reference)
    assert [r["ranks"] for r in results] == [{"dp": 0, "tp": t, "pp": 0, "cp": 0} for t in (0, 1)]
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["split"] == sorted(f"blocks.{i}.{m}.{p}" for i in range(4) for m in ("up", "down")
                                         for p in ("weight", "bias"))  # fmt: skip
    assert results[0]["local_up"] == (8, 8)  # half of the 16 output features
    assert results[0]["late_optimizer"]
    assert results[1]["mesh"] == (("pp", "dp_replicate", "dp_shard", "cp", "tp"), (1, 1, 1, 1, 2), "ddp")


# -- FSDP2 x tensor parallel, and the data path over the data-parallel group ------------------------------


def _data_checks() -> dict[str, Any]:
    """Four ranks as 2 data-parallel x 2 tensor-parallel: what each rank gets and gathers."""
    from distrib import distributed, gather, gather_for_metrics, prepare, reduce, split_between_processes

    dataset = TensorDataset(torch.arange(13))
    with distributed(parallelism={"dp_shard": 2, "tp": 2}) as ctx:
        loader = prepare(DataLoader(dataset, batch_size=2))
        batches, gathered = [], []
        for (x,) in loader:
            batches.append(x.tolist())
            gathered += gather_for_metrics(x).tolist()
        with split_between_processes(list(range(5))) as share:
            mine = share
        return {
            "batches": batches,
            "gathered": gathered,
            "share": mine,
            "mean": float(reduce(torch.tensor(float(ctx.dp_rank)), "mean")),
            "gather": gather(torch.tensor([ctx.rank])).tolist(),
            "dims": (ctx.dp_rank, ctx.dp_world_size, ctx.tp_rank, ctx.tp_size, ctx.dp_shard_size),
        }


def _fsdp_tp_worker() -> dict[str, Any]:
    out = train(
        batch_size=2, epochs=2, strategy="fsdp", parallelism={"dp_shard": 2, "tp": 2, "tp_plan": PLAN}
    )
    out["data"] = _data_checks()
    # HSDP x TP: FSDP2 replicates over dp_replicate=2 (its shard dimension has size 1 here)
    hsdp = {"dp_replicate": 2, "tp": 2, "tp_plan": PLAN}
    out["hsdp_tp"] = train(batch_size=2, epochs=2, strategy="fsdp", parallelism=hsdp)
    # the same four ranks as 2 pipeline stages x 2 data-parallel replicas, accumulating over 2 steps
    out["pp_dp"] = train(
        batch_size=2, epochs=2, parallelism={"pp": 2, "dp_shard": 2}, gradient_accumulation_steps=2
    )
    return out


def test_fsdp_times_tensor_parallel_2x2_equals_one_process(reference):
    results = run_ranks(in_one_group, 4, _fsdp_tp_worker, timeout=400)
    _close(results[0], reference)  # 2 data-parallel ranks x batch 2 = the reference's batch of 4
    _close(results[0]["pp_dp"], train(epochs=2, gradient_accumulation_steps=2))
    _close(results[0]["hsdp_tp"], reference)
    assert [r["pp_dp"]["ranks"]["pp"] for r in results] == [0, 0, 1, 1]
    assert [r["ranks"]["dp"] for r in results] == [0, 0, 1, 1]
    assert [r["ranks"]["tp"] for r in results] == [0, 1, 0, 1]
    data = [r["data"] for r in results]
    assert data[0]["batches"] == data[1]["batches"] == [[0, 1], [4, 5], [8, 9], [12, 0]]
    assert data[2]["batches"] == data[3]["batches"] == [[2, 3], [6, 7], [10, 11], [1, 2]]
    assert all(d["gathered"] == list(range(13)) for d in data)  # the padding of even_batches dropped
    assert [d["share"] for d in data] == [[0, 1, 2], [0, 1, 2], [3, 4], [3, 4]]
    assert all(d["mean"] == 0.5 for d in data)  # over the data-parallel ranks 0 and 1
    # one copy per data-parallel rank, from the first rank of each tensor-parallel group, everywhere
    assert [d["gather"] for d in data] == [[0, 2]] * 4
    assert [d["dims"] for d in data] == [(0, 2, 0, 2, 2), (0, 2, 1, 2, 2), (1, 2, 0, 2, 2), (1, 2, 1, 2, 2)]


# -- pipelines ---------------------------------------------------------------------------------------------


def _pipeline_worker(directory: str) -> dict[str, Any]:
    from distrib import distributed, prepare
    from distrib.errors import TrainingError

    out = {
        "gpipe": train(
            epochs=2, parallelism={"pp": 2, "pp_schedule": "gpipe"}, save_after_first=f"{directory}/gpipe"
        ),
        # 1F1B, with 4 micro-batches per step and gradient accumulation over 2 steps
        "1f1b": train(epochs=2, parallelism={"pp": 2, "pp_microbatches": 4}, gradient_accumulation_steps=2),
    }
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    with distributed(parallelism={"pp": 2, "pp_microbatches": 3}):
        model = prepare(make_model())
        errors = []
        for misuse in (
            lambda: model(x),  # training mode, no target
            lambda: model(x, target=torch.zeros(6, dtype=torch.long)),  # no loss function
            lambda: model(x[:4], target=torch.zeros(4, dtype=torch.long), loss_fn=loss_fn),  # 4 % 3
        ):
            try:
                misuse()
            except TrainingError as exc:
                errors.append(str(exc))
        model(x, target=torch.zeros(6, dtype=torch.long), loss_fn=loss_fn)
        try:
            model(x, target=torch.zeros(6, dtype=torch.long), loss_fn=lambda o, t: loss_fn(o, t))
        except TrainingError as exc:
            errors.append(str(exc))
        model.eval()
        with torch.no_grad():
            out["eval"] = model(x)
        out["errors"] = errors
        out["kinds"] = (type(model).__name__, type(model.module).__name__)
    return out


def test_pipeline_with_both_schedules_equals_one_process(reference, tmp_path: Path):
    accumulated = train(epochs=2, gradient_accumulation_steps=2)
    results = run_ranks(in_one_group, 2, _pipeline_worker, str(tmp_path), timeout=400)
    for schedule, expected in (("gpipe", reference), ("1f1b", accumulated)):
        _close(results[0][schedule], expected)
        assert results[0][schedule]["losses"] == results[1][schedule]["losses"]  # every stage returns it
    assert [r["gpipe"]["ranks"]["pp"] for r in results] == [0, 1]
    errors = results[0]["errors"]
    assert "pass the targets and the loss" in errors[0] and "needs the loss function" in errors[1]
    assert "batch of 4" in errors[2] and "pp_microbatches" in errors[2]
    assert "different loss_fn" in errors[3]
    assert results[0]["kinds"] == ("PipelinedModel", "BlockNet")
    # evaluation: the last stage's output reaches every stage, and equals the whole model's
    assert torch.equal(results[0]["eval"], results[1]["eval"]) and results[0]["eval"].shape == (6, 4)
    # the pipeline's checkpoint reloads in one process without parallelism, and save_model wrote it whole
    saved = results[0]["gpipe"]["saved"]
    assert max_difference(train(epochs=0, load_from=str(tmp_path / "gpipe"))["state"], saved) == 0
    resumed = train(epochs=1, load_from=str(tmp_path / "gpipe"))  # and trains on as the pipeline did
    assert max_difference(resumed["state"], results[0]["gpipe"]["state"]) < TOL
    released = load_file(tmp_path / "gpipe-model" / "model.safetensors")
    assert max_difference(released, saved) == 0 and released.keys() == make_model().state_dict().keys()


# -- checkpoints between layouts ----------------------------------------------------------------------------


def test_a_tensor_parallel_checkpoint_reloads_at_tp1_and_as_fsdp_only(reference, tmp_path: Path):
    checkpoint = str(tmp_path / "tp2")
    tp = run_ranks(train, 2, timeout=300, batch_size=4, epochs=2, save_after_first=checkpoint,
                   parallelism={"tp": 2, "tp_plan": PLAN})[0]  # fmt: skip
    _close(tp, reference)
    # one process, no parallelism: resumes where the tensor-parallel run was and trains on identically
    alone = train(batch_size=4, epochs=1, load_from=checkpoint)
    assert max_difference(alone["state"], tp["state"]) < TOL
    # FSDP only (2 data-parallel ranks x batch 2): the same
    fsdp = run_ranks(train, 2, timeout=300, batch_size=2, epochs=1, load_from=checkpoint, strategy="fsdp")[0]
    assert max_difference(fsdp["state"], tp["state"]) < TOL
    # plain DDP on 2 processes (tp=1, 2 data-parallel ranks x batch 2): the same
    ddp = run_ranks(train, 2, timeout=300, batch_size=2, epochs=1, load_from=checkpoint)[0]
    assert max_difference(ddp["state"], tp["state"]) < TOL
    released = load_file(tmp_path / "tp2-model" / "model.safetensors")
    assert max_difference(released, tp["saved"]) == 0  # save_model: the whole model, unsharded


def test_a_2x2_checkpoint_reshards_to_4_data_parallel_ranks(reference, tmp_path: Path):
    checkpoint = str(tmp_path / "2x2")
    settings = {"strategy": "fsdp", "epochs": 2, "save_after_first": checkpoint}
    grid = run_ranks(train, 4, timeout=400, batch_size=2, parallelism={"dp_shard": 2, "tp": 2, "tp_plan": PLAN},
                     **settings)[0]  # fmt: skip
    flat = run_ranks(train, 4, timeout=400, batch_size=1, epochs=1, load_from=checkpoint, strategy="fsdp")[0]
    assert max_difference(flat["state"], grid["state"]) < TOL
    assert max_difference(grid["state"], reference["state"]) < TOL


# -- a transformers model under the built-in plan ------------------------------------------------------------


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: each position predicts the next id."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))


def _train_llama(**settings: Any) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from distrib import backward, clip_grad_norm_, distributed, prepare

    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    with distributed(**settings) as ctx:
        model = _llama()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer, loader = prepare(model, optimizer, DataLoader(TensorDataset(ids), batch_size=4))
        losses = []
        for _ in range(2):
            for (batch,) in loader:
                if ctx.pp_size > 1:  # the pipeline computes the loss on its last stage
                    loss = model(batch, target=batch, loss_fn=_lm_loss)
                else:
                    loss = _lm_loss(model(input_ids=batch).logits, batch)
                backward(loss)
                clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        split = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
        full = ctx.strategy_module.full_state_dict(ctx, model)
        return {"losses": losses, "split": split, "state": full}


def _llama_worker() -> dict[str, Any]:
    return {"tp": _train_llama(parallelism={"tp": 2}), "pp": _train_llama(parallelism={"pp": 2})}


def test_a_transformers_llama_trains_under_tp2_with_the_builtin_plan_and_as_a_pipeline():
    reference = _train_llama()
    results_all = run_ranks(in_one_group, 2, _llama_worker, timeout=400)
    results = [r["tp"] for r in results_all]
    assert max(abs(a - b) for a, b in zip(results[0]["losses"], reference["losses"], strict=True)) < 1e-5
    assert reference["losses"][-1] < reference["losses"][0]
    assert max_difference(results[0]["state"], reference["state"]) < 1e-5
    split = results[0]["split"]
    assert (
        "model.layers.0.self_attn.q_proj.weight" in split and "model.layers.1.mlp.down_proj.weight" in split
    )
    assert "model.embed_tokens.weight" in split and "lm_head.weight" in split
    assert "model.layers.0.input_layernorm.weight" not in split
    # the same model cut into 2 pipeline stages (embedding + layer 0, layer 1 + norm + head)
    pipelined = [r["pp"] for r in results_all]
    assert max(abs(a - b) for a, b in zip(pipelined[0]["losses"], reference["losses"], strict=True)) < 1e-5
    assert max_difference(pipelined[0]["state"], reference["state"]) < 1e-5

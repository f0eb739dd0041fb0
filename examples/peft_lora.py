"""Fine-tune a transformers causal LM with PEFT's LoRA adapters, under DDP, FSDP2 or DeepSpeed ZeRO-3.

Offline: a small GPT-2 is built from a config (no hub download) and trained on synthetic token sequences
(the next token is the current one plus one, modulo the vocabulary). Only the LoRA adapters train; the
base weights stay frozen, which the script checks on the gathered full state dict.

distrib launch --num-processes 2 examples/peft_lora.py                             # DDP
distrib launch --num-processes 2 --strategy fsdp examples/peft_lora.py              # FSDP2
distrib launch --num-processes 2 --strategy deepspeed --zero-stage 3 examples/peft_lora.py

The lines marked `# distrib` are all distrib adds to a single-GPU PEFT loop. With a real model, load it with
`AutoModelForCausalLM.from_pretrained(name)` inside `main_process_first()`.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from distrib import accumulate, backward, distributed, get_state_dict, prepare, print, reduce  # distrib

VOCAB, LENGTH = 128, 16


def make_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4)
    base = GPT2LMHeadModel(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], lora_dropout=0.0)
    return get_peft_model(base, lora)


def make_data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return TensorDataset((start + torch.arange(LENGTH)) % VOCAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with distributed(gradient_accumulation_steps=2) as ctx:  # distrib
        model = make_model()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"strategy {ctx.strategy}: training {trainable} of {total} parameters (LoRA)")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        loader = DataLoader(make_data(256), batch_size=8, shuffle=True)
        model, optimizer, loader = prepare(model, optimizer, loader)  # distrib
        for epoch in range(args.epochs):
            for (tokens,) in loader:
                with accumulate(model):  # distrib
                    loss = model(input_ids=tokens, labels=tokens).loss
                    backward(loss)  # distrib
                    optimizer.step()
                    optimizer.zero_grad()
            print(f"epoch {epoch}: loss {reduce(loss.detach(), 'mean').item():.3f}")
        after = get_state_dict(model)  # distrib: the whole model, gathered on the main process
        if after is not None:
            lora = [k for k in before if "lora_" in k]
            changed = all(
                not torch.equal(before[k], after[k].to(before[k].dtype)) for k in lora if "lora_B" in k
            )
            frozen = all(
                torch.equal(before[k], after[k].to(before[k].dtype)) for k in before if "lora_" not in k
            )
            print(f"lora weights changed: {changed}; base weights unchanged: {frozen}")


if __name__ == "__main__":
    main()

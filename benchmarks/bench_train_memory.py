"""What Engram costs: a training step and generation, memory on vs off, side by side.

Training step (both arms see the same recall episodes and learn the language model on all of
their text — the session-1 segments and the session-2 question, two forward passes):
  off  the plain mHC model (module absent);
  on   the Engram model: the session-1 pass also yields the traces (hidden states at the memory
       layer, captured in the same pass), the writer pools and scores them into a
       TensorMemory, and the question pass reads from it.
Generation: greedy decoding of the answer after the question's prompt (no KV cache in either
arm); ``on`` retrieves from and attends over the episode's traces at every generated token.
The traces themselves are made before the timer starts: session 1 wrote them when it ran.

Medians over repeated, interleaved measurements (off, on, off, on, ...) in one process.

    python benchmarks/bench_train_memory.py                       # tiny on this CPU
    python benchmarks/bench_train_memory.py --preset small --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._results import append_result, environment  # noqa: E402
from engram.backends import TensorMemory  # noqa: E402
from engram.config import EngramConfig  # noqa: E402
from engram.model import EngramModel  # noqa: E402
from mhc import presets  # noqa: E402
from sessions.memory_train import build_memory  # noqa: E402
from sessions.tasks.recall import RecallTask  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else contextlib.nullcontext())


def train_step(model: EngramModel, batch, device, opt) -> None:
    B, N, S = batch.write_BNS.shape
    writes = batch.write_BNS.reshape(B * N, S).to(device)
    with _autocast(device):
        if model.memory_enabled:
            captured = {}

            def capture(i, h):
                if i == model.write_layer:
                    captured["h"] = h
                return h

            out_w = model.backbone(writes[:, :-1], writes[:, 1:], layer_hook=capture)
            h = captured["h"]
            tr = model.writer(h, torch.ones_like(writes[:, :-1], dtype=torch.bool),
                              writes[:, :-1])
            mem = TensorMemory(B, h.shape[-1], model.cfg.key_dim, h.shape[1], device, h.dtype)
            mem.write(tr.key_NK.view(B, N, -1), tr.hidden_NSD.view(B, N, *h.shape[1:]),
                      tr.mask_NS.view(B, N, -1), tr.tokens_NS.view(B, N, -1),
                      tr.salience_N.view(B, N), session=0)
            res = model(batch.question_BS.to(device), batch.targets_BS.to(device), memory=mem,
                        session=1)
            loss = out_w.loss + res.out.loss + model.writer.salience_loss(mem.salience_BM)
        else:
            out_w = model.backbone(writes[:, :-1], writes[:, 1:])
            res = model(batch.question_BS.to(device), batch.targets_BS.to(device))
            loss = out_w.loss + res.out.loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def session_memory(model: EngramModel, batch, device) -> TensorMemory | None:
    """The traces session 1 left behind (written when session 1 ran: not generation time)."""
    if not model.memory_enabled:
        return None
    with _autocast(device):
        return build_memory(model, batch, "all")


@torch.no_grad()
def generate(model: EngramModel, batch, device, n_new: int, mem) -> int:
    B = batch.question_BS.shape[0]
    with _autocast(device):
        prompt_len = int(batch.answer_pos_B4[0, 0]) + 1
        idx = batch.question_BS[:, :prompt_len].to(device)
        for _ in range(n_new):
            logits = model(idx, memory=mem, session=1).out.logits[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], 1)
    return B * n_new


def timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8, help="episodes per step")
    p.add_argument("--repeats", type=int, default=10, help="measurements per arm")
    p.add_argument("--gen-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = presets.load(args.preset, args.overrides)
    task = RecallTask(n_facts=3, n_distractors=7)
    torch.manual_seed(0)
    models = {"off": EngramModel(run.model, EngramConfig(enabled=False)).to(device),
              "on": EngramModel(run.model, EngramConfig(enabled=True)).to(device)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    batches = [task.batch(i * args.batch, args.batch) for i in range(args.repeats + 2)]
    times = {f"{kind}_{arm}": [] for kind in ("step", "gen") for arm in models}
    for i, batch in enumerate(batches):
        for arm, model in models.items():  # interleaved: off, on, off, on ...
            step_s = timed(lambda m=model, a=arm, b=batch: train_step(m, b, device, opts[a]),
                           device)
            mem = session_memory(model, batch, device)
            gen_s = timed(lambda m=model, b=batch, mm=mem: generate(m, b, device,
                                                                    args.gen_tokens, mm),
                          device)
            if i >= 2:  # the first two rounds are warm-up
                times[f"step_{arm}"].append(step_s)
                times[f"gen_{arm}"].append(args.batch * args.gen_tokens / gen_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"preset": args.preset, "device": args.device, "batch": args.batch,
           "repeats": args.repeats, "step_ms_off": med["step_off"] * 1e3,
           "step_ms_on": med["step_on"] * 1e3, "step_ratio": med["step_on"] / med["step_off"],
           "gen_tok_s_off": med["gen_off"], "gen_tok_s_on": med["gen_on"],
           "gen_ratio": med["gen_on"] / med["gen_off"]}
    env = environment()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    print(f"{'preset':8} {'device':6} {'step off ms':>12} {'step on ms':>11} {'ratio':>6} "
          f"{'gen off tok/s':>14} {'gen on tok/s':>13} {'ratio':>6}")
    print(f"{args.preset:8} {args.device:6} {row['step_ms_off']:12.1f} {row['step_ms_on']:11.1f} "
          f"{row['step_ratio']:6.2f} {row['gen_tok_s_off']:14.1f} {row['gen_tok_s_on']:13.1f} "
          f"{row['gen_ratio']:6.2f}")
    print(f"env: {env}")
    if not args.no_save:
        append_result("bench_train_memory", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

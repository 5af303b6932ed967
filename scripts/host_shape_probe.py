"""Does a host (CPU) expert MLP pay a first-call cost for each new row count? (issue 13)

Times moeray.kernels.reference.swiglu in bf16 on the CPU for row counts never seen before, the
first call and then a repeat, with torch's CPU threads as a lone GPU worker's. If the first call
of a new row count costs far more than the repeat (a oneDNN primitive built per shape), prefill's
varied per-expert row counts pay it step after step. Prints JSON; argument: hidden,ffn (default
OLMoE's 2048,1024).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from moeray.kernels.reference import swiglu


def main() -> None:
    hidden, ffn = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "2048,1024").split(","))
    gen = torch.Generator().manual_seed(0)
    w13_HD = (torch.randn(2 * ffn, hidden, generator=gen) * hidden ** -0.5).to(torch.bfloat16)
    w2_DF = (torch.randn(hidden, ffn, generator=gen) * ffn ** -0.5).to(torch.bfloat16)
    out = {"threads": torch.get_num_threads(), "hidden": hidden, "ffn": ffn, "rows": []}
    swiglu(torch.randn(64, hidden).to(torch.bfloat16), w13_HD, w2_DF)  # the library's own start
    for rows in (3, 5, 7, 11, 13, 17, 23, 37, 61, 97, 131, 173, 237, 241, 251, 263, 301, 389, 397, 509):
        x_RD = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            swiglu(x_RD, w13_HD, w2_DF)
            times.append(time.perf_counter() - start)
        out["rows"].append({"rows": rows, "first_ms": 1e3 * times[0], "repeat_ms": 1e3 * min(times[1:])})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

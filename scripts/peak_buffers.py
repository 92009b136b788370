"""What fills a compiled step's memory at its peak, grouped by the op that made each buffer.

Compile with an XLA dump (the planner passes XLA_FLAGS through to its compile), then read it:

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" \
      python -m switch_t5.plan --gin_file=configs/models/switch_c_2048.gin --devices=2048 ...
    python scripts/peak_buffers.py /tmp/dump/module_*.jit_train_step.cpu_after_optimizations

XLA writes `<prefix>-live-range.txt` (the values live at the peak of the schedule, with their
sizes) next to the optimized HLO `<prefix>.txt` (each value's shape and `op_name`). The peak's
values are grouped by op_name with the scanned layers' scopes folded into `<layer>`; entry
parameters (the train state and the batch) form one group.
"""

from __future__ import annotations

import argparse
import collections
import re

_VALUE = re.compile(r"^\s+([\w.\-]+)\{([\d,]*)\}: (\d+) bytes", re.M)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\((.*)$", re.M)


def _instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """{name: (result shape, opcode, op_name)} of the optimized HLO."""
    out = {}
    for m in _INSTRUCTION.finditer(hlo):
        op = re.search(r'op_name="([^"]*)"', m.group(4))
        out[m.group(1)] = (
            re.sub(r"\{[\d,]*\}", "", m.group(2)),
            m.group(3),
            op.group(1) if op else "",
        )
    return out


def _group(name: str, opcode: str, op_name: str) -> str:
    if name.startswith("param"):
        return "entry parameters (train state, batch)"
    short = op_name.removeprefix("jit(train_step)/")
    short = re.sub(r"/while/body/closed_call/layers/subblock_\d+", "/<layer>", short)
    short = re.sub(r"EncoderDecoder\.(encode|decode)/", "", short)
    return f"{short or name.rsplit('.', 1)[0]} ({opcode})"


def peak_groups(live_range: str, hlo: str) -> tuple[int, list[tuple[str, int, int, list]]]:
    """(peak bytes, [(group, bytes, values, [(shape, count), ...]), ...] largest first)."""
    peak = live_range.split("(peak):", 1)[1].split("Stack trace breakdown", 1)[0]
    instructions = _instructions(hlo)
    groups: dict[str, list] = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    total = 0
    for name, index, size in _VALUE.findall(peak):
        shape, opcode, op_name = instructions.get(name, ("?", "?", ""))
        if index and shape.startswith("("):
            parts = re.findall(r"[a-z]+\d*\[[\d,]*\]", shape)
            shape = parts[int(index.split(",")[0])] if parts else shape
        group = groups[_group(name, opcode, op_name)]
        group[0] += int(size)
        group[1] += 1
        group[2][shape] += 1
        total += int(size)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return total, [(k, b, n, shapes.most_common(3)) for k, (b, n, shapes) in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="<dump>/module_N.jit_train_step.cpu_after_optimizations")
    parser.add_argument("--top", type=int, default=20, help="groups to print")
    args = parser.parse_args()
    with open(args.prefix + "-live-range.txt") as f:
        live_range = f.read()
    with open(args.prefix + ".txt") as f:
        hlo = f.read()
    total, groups = peak_groups(live_range, hlo)
    print(f"peak: {total / 2**30:.2f} GiB live")
    print("| GiB | buffers | made by (op_name, opcode) | largest shapes |")
    print("| --- | --- | --- | --- |")
    for group, size, count, shapes in groups[: args.top]:
        examples = ", ".join(f"{c} x {s}" for s, c in shapes)
        print(f"| {size / 2**30:.2f} | {count} | {group[:100]} | {examples} |")


if __name__ == "__main__":
    main()

"""The functions of a binary that ran, from a callgrind profile made with
`--dump-instr=yes`, hottest first: the symbol ordering file the linker uses to put
them next to each other (see oauth-proxy/build.rs).

Usage: symbol_order.py CALLGRIND_FILE BINARY OUTPUT
       symbol_order.py --check [--strict] BINARY LIST   (how many of LIST's names BINARY
       has; with --strict, exit 1 unless it has them all)
"""

import bisect
import re
import subprocess
import sys


def executed_costs(profile, binary_name):
    """Instruction address -> instructions executed there, for BINARY's own code."""
    objects, costs = {}, {}
    ours, last, positions, after_call = False, 0, 1, False
    with open(profile) as lines:
        for line in lines:
            if line.startswith("positions:"):
                # "instr line": the cost follows both positions.
                positions = len(line.split()) - 1
                continue
            if line.startswith(("ob=", "cob=")):
                kind, number, name = re.match(r"^(c?ob)=\((\d+)\)(?: (.*))?$", line.rstrip("\n")).groups()
                if name:
                    objects[number] = name
                if kind == "ob":
                    ours = objects[number].endswith("/" + binary_name)
                continue
            first = line[:1]
            fields = line.split()
            if line.startswith("0x"):
                position = int(fields[0], 16)
            elif first in "+-":
                position = last + int(fields[0])
            elif first == "*":
                position = last
            else:
                # The line after `calls=` holds the call's inclusive cost, not the
                # call site's own, and its position does not move the reference of
                # the next relative one.
                after_call = line.startswith("calls=")
                continue
            if after_call:
                after_call = False
                if ours:
                    costs.setdefault(position, 0)
                continue
            last = position
            if ours:
                cost = int(fields[positions]) if len(fields) > positions else 0
                costs[last] = costs.get(last, 0) + cost
    return costs


def text_symbols(binary):
    """(start, size, name) of every function symbol, by address."""
    out = subprocess.run(["nm", "-S", binary], capture_output=True, text=True, check=True).stdout
    symbols = []
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]+) ([0-9a-f]+) ([tTwW]) (.+)$", line)
        if m:
            symbols.append((int(m.group(1), 16), int(m.group(2), 16), m.group(4)))
    return sorted(symbols)


def check(binary, listed, strict):
    """Prints how many names of the list the binary has (a stale list helps less);
    strict, fails when any is missing: the code changed since the list was made."""
    names = {s[2] for s in text_symbols(binary)}
    with open(listed) as f:
        wanted = [line.strip() for line in f if line.strip()]
    found = sum(1 for n in wanted if n in names)
    print(f"symbol order: {found} of {len(wanted)} listed functions are in {binary}")
    if strict and found < len(wanted):
        sys.exit(
            f"{listed} is stale: {len(wanted) - found} of its {len(wanted)} names are not in this build "
            "(some names change with any change of the code, a dependency or the compiler); "
            "run `make proxy-symbol-order` and commit the list"
        )


def main():
    if sys.argv[1] == "--check":
        strict = len(sys.argv) > 2 and sys.argv[2] == "--strict"
        if len(sys.argv) != 4 + strict:
            sys.exit("usage: symbol_order.py --check [--strict] BINARY LIST")
        check(sys.argv[2 + strict], sys.argv[3 + strict], strict)
        return
    profile, binary, output = sys.argv[1:4]
    costs = executed_costs(profile, binary.rsplit("/", 1)[-1])
    symbols = text_symbols(binary)
    starts = [s[0] for s in symbols]
    per_function, outside = {}, 0
    for address, cost in costs.items():
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < symbols[i][0] + symbols[i][1]:
            name = symbols[i][2]
            per_function[name] = per_function.get(name, 0) + cost
        else:
            outside += 1
    if not per_function:
        sys.exit(f"no function of {binary} in {profile}: was it profiled with --dump-instr=yes?")
    size = {s[2]: s[1] for s in symbols}
    # Names with an LLVM suffix (`.1234`: copies of small generic helpers, one per crate
    # that used them) are kept although the number changes with any change of the code:
    # left out, each pulled a 64 KB block of cold code in (about 1 MB together). So the
    # list is regenerated with the code, and CI checks that every name is in the build.
    ranked = sorted(per_function, key=lambda n: (-per_function[n], n))
    with open(output, "w") as out:
        out.write("".join(name + "\n" for name in ranked))
    ran = sum(size[n] for n in ranked)
    total = sum(s[1] for s in symbols)
    print(
        f"{len(ranked)} functions ran ({ran // 1024} KiB of {total // 1024} KiB of code); "
        f"{outside} instruction addresses outside any symbol (PLT stubs); wrote {output}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

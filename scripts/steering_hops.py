"""The path of a steering spec from `saesteer eval --steering refusal_conditional` to its SAE edit (issue 23).

Runs the eval verb in this process on the given prompts (harmful ones, so the gate fires) with 2 new tokens,
and prints the saesteer frames on the stack when the SAE edit first runs, and how often the spec was parsed
(`parse_steering`, `steering_from_dict`: a conditional spec and its inner steering are two calls of one parse)
and the gate scored (`detectors.gate_scores`, once per batch of prompts).

    python scripts/steering_hops.py PROMPTS.txt OUT.jsonl
"""

from __future__ import annotations

import collections
import sys
import threading
import traceback

from saesteer import cli

COUNTED = {
    ("steering.py", "parse_steering"),
    ("steering.py", "steering_from_dict"),
    ("specs.py", "build"),
    ("specs.py", "spec_from_dict"),
    ("detectors.py", "gate_scores"),
}


def main(prompts: str, out: str) -> None:
    stack, calls = [], collections.Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        where = (code.co_filename.rsplit("/", 1)[-1], code.co_name)
        if where == ("steering.py", "steer") and not stack:
            stack.extend(f for f in traceback.extract_stack(frame) if "/saesteer/" in f.filename)
        if where in COUNTED:
            calls[where[1]] += 1

    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        args = ["eval", "--steering", "refusal_conditional", "--prompts", prompts, "--label", "unsafe"]
        cli.app([*args, "--max-new-tokens", "2", "--out", out], standalone_mode=False)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    print(f"saesteer frames from the verb to the SAE edit: {len(stack)}")
    for f in stack:
        print(f"  {f.filename.split('/saesteer/')[-1]}:{f.lineno} {f.name}")
    print("calls:", dict(sorted(calls.items())))


if __name__ == "__main__":
    main(*sys.argv[1:3])

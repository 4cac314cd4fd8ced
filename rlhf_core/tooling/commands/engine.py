"""`rlhf engine status|stop`: the warm vLLM engine of rollout.engine: vllm (rlhf_core.phases.vllm_client).

The engine runs from the repository root's ``.rlhf/vllm/``: `status` prints where it listens, its process id,
what it serves and how many engines this checkout has started; `stop` stops it (its own /stop, then signals to its
process id alone).  A warm engine also stops by itself after vllm.idle_timeout_s without a request.
"""

from __future__ import annotations

import json

from rlhf_core.tooling.commands._common import root


def run(args) -> int:
    from rlhf_core.phases.vllm_client import STATE_DIR, read_state, stop_engine

    state_dir = root() / STATE_DIR
    if args.action == "stop":
        state = stop_engine(state_dir)
        print(f"stopped the vLLM engine {state['instance']} (pid {state['pid']})" if state else "no vLLM engine running")
        return 0
    state = read_state(state_dir)
    starts = state_dir / "starts.jsonl"
    count = len(starts.read_text().splitlines()) if starts.is_file() else 0
    if state is None:
        print(f"no vLLM engine running ({count} started from this checkout)")
        return 0
    spec = state["spec"]
    print(json.dumps({"instance": state["instance"], "pid": state["pid"], "address": f"{state['host']}:{state['port']}",
                      "vllm": state.get("vllm_version"), "start_seconds": round(state["start_seconds"], 2),
                      "base": spec["weights"], "dtype": spec["dtype"], "lora_rank": spec["lora_rank"],
                      "engines_started": count}, indent=2))
    return 0

"""One process of the two-process tests in test_multihost.py (run as a script, not collected).

    python tests/multihost_worker.py PROCESS_ID PORT MODEL MODE
MODE "generate": process 0 generates and prints JSON; "die": process 1 exits after the first
request and process 0 then tries another (it must fail with a clear error, not hang).
PROCESS_ID and PORT "env": the program does not call jax.distributed.initialize; LLM(...) does,
from the JAXLLM_* variables that ``jaxllm launch`` sets.
"""

import json
import os
import sys
import tempfile
import time

pid, port, model, mode = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if pid == "env":
    pid = int(os.environ["JAXLLM_PROCESS_ID"])
else:
    pid = int(pid)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               heartbeat_timeout_seconds=10, initialization_timeout=60)

from jaxllm import LLM, SamplingParams  # noqa: E402

PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": list(range(10, 50))}]
SP = SamplingParams(max_tokens=6, ignore_eos=True)

# "die": process 0 drops this file once the first request is served; process 1, which followed that
# request's device calls, then vanishes without a word (a file, not a timer: a loaded machine is slow)
SERVED = os.path.join(tempfile.gettempdir(), f"jaxllm-multihost-{port}.served")
if mode == "die" and pid == 1:
    import threading

    def vanish_once_served():
        while not os.path.exists(SERVED):
            time.sleep(0.1)
        os._exit(3)

    threading.Thread(target=vanish_once_served, daemon=True).start()
llm = LLM(model, tensor_parallel_size=4, compilation_cache=False, max_seq_len=128)
assert jax.process_count() == 2 and jax.process_index() == pid
if pid == 0:
    outs = llm.generate(PROMPTS, SP, use_tqdm=False)
    print("RESULT " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
    if mode == "die":
        open(SERVED, "w").close()
        time.sleep(2)  # process 1 is gone by now
        os.remove(SERVED)
        t0 = time.time()
        try:
            llm.generate(PROMPTS, SP, use_tqdm=False)
            print("NO ERROR", flush=True)
        except Exception as e:  # noqa: BLE001 - what the user sees is the point
            print("ERROR after %.1fs: %s" % (time.time() - t0, str(e).splitlines()[0][:300]), flush=True)
            os._exit(0)
    llm.shutdown()
else:
    assert llm.follower
    try:
        llm.generate(PROMPTS, SP, use_tqdm=False)
    except RuntimeError as e:
        print("FOLLOWER " + str(e), flush=True)

"""Test launcher: `vlmserve serve` on the demo model, whose sampler follows a script when the user asks for one.

When the last user turn of a prompt contains one of the triggers in VLMSERVE_TEST_SCRIPTS (a JSON object: trigger →
answer text), the token chosen at each step is replaced by the next token of that answer (the demo tokenizer is
byte-level, so any text encodes), then the end-of-turn token; each such step also waits STEP_DELAY_S, so a browser
can watch the answer arrive and stop it midway. Every other request is answered by the model as usual. The real
engine, detokenizer and streaming run throughout; production code has no test hook: the patch is applied here,
before the server starts.

Environment: VLMSERVE_TEST_SCRIPTS, VLMSERVE_TEST_STEP_DELAY_S (seconds, default 0.02).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from transformers import AutoTokenizer

from vlmserve.cli import main
from vlmserve.demo import __file__ as demo_init
from vlmserve.engine import sampler

STEP_DELAY_S = float(os.environ.get("VLMSERVE_TEST_STEP_DELAY_S", "0.02"))
_tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(demo_init), "weights"))
SCRIPTS: dict[str, list[int]] = {trigger: _tokenizer.encode(text, add_special_tokens=False)
                                 for trigger, text in json.loads(os.environ["VLMSERVE_TEST_SCRIPTS"]).items()}
END_ID = int(_tokenizer.convert_tokens_to_ids("<|im_end|>"))

_original_call = sampler.Sampler.__call__


def script_for(sequence: sampler.SequenceSampling) -> list[int] | None:
    last_user_turn = _tokenizer.decode(sequence.prompt_token_ids).rsplit("<|im_start|>user", 1)[-1]
    return next((ids for trigger, ids in SCRIPTS.items() if trigger in last_user_turn), None)


def scripted_call(self: sampler.Sampler, logits: Any, sequences: list[sampler.SequenceSampling]
                  ) -> sampler.SamplerOutput:
    output = _original_call(self, logits, sequences)
    for row, sequence in enumerate(sequences):
        script = script_for(sequence)
        if script is not None:
            done = len(sequence.output_token_ids)
            output.token_ids[row] = script[done] if done < len(script) else END_ID
            time.sleep(STEP_DELAY_S)
    return output


sampler.Sampler.__call__ = scripted_call  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A tiny real tokenizer for tests, built offline (no model hub access).

``make_test_tokenizer()`` trains a byte-level BPE (vocab ~500) on a few hundred
lines of generated text and wraps it in a ``transformers.PreTrainedTokenizerFast``
with ChatML special tokens and a SmolLM2-style chat template::

    <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n

Byte-level BPE can encode any string, so tests may feed arbitrary text.
``len(tok)`` is the true vocabulary size (use it to size tiny random models).
The result is cached; treat it as read-only.
"""

from __future__ import annotations

import functools
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 500

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the a of to is and in what who when which capital city founded year river "
    "answer question response example think step first then so because number "
    "Zorbia Quelmarsh Velandor Tirrik inventor founder built named country town "
    "you I we it was were has have can will would should please explain why how "
    "one two three four five six seven eight nine ten hundred thousand plus minus"
).split()


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        line = " ".join(words)
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 2025)}"
        lines.append(line.capitalize() + rng.choice([".", "?", "!", ":", ","]))
    lines.append("{prompt} {demonstration} {} [] () <> \"quotes\" 'single' \n\t")
    return lines


@functools.lru_cache(maxsize=None)
def make_test_tokenizer() -> PreTrainedTokenizerFast:
    """Build (once) a small byte-level BPE ChatML tokenizer; see module docstring."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=8192,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok

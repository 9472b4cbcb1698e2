"""Our model against Hugging Face transformers on the same GGUF weights.

float32: logits agree to 1e-3 absolute (logits are O(10)) and greedy continuations
of chat prompts are identical. bfloat16: the easy answer is still right.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker.model.loader import packaged_model_path
from services.worker.request import ChatTurn, SamplingParams
from services.worker.runner import ModelRunner
from services.worker.sequence import GenSequence
from services.worker.service import REPO_ROOT
from services.worker.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

LOGIT_ATOL = 1e-3
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
]
NEW_TOKENS = 32
CACHE = REPO_ROOT / ".cache" / "worker"


def reference_folder(gguf: Path) -> Path:
    """HF's own dequantisation of the GGUF, saved once as float32 safetensors (~18 s to build)."""
    folder = CACHE / "reference" / f"{gguf.stem}-float32"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded "quantised"; the tensors are plain float32 by now.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def gguf() -> Path:
    return packaged_model_path()


@pytest.fixture(scope="module")
def hf_model(gguf: Path) -> Iterator[Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(reference_folder(gguf)), dtype=torch.float32).eval()
    yield model
    del model


@pytest.fixture(scope="module")
def runner(gguf: Path) -> ModelRunner:
    runner, _ = ModelRunner.load(gguf, torch.device("cpu"), torch.float32, max_context=512)
    return runner


@pytest.fixture(scope="module")
def tokenizer(gguf: Path) -> Tokenizer:
    return Tokenizer.load(gguf, CACHE, eos_token_ids=(2,))


def chat_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([ChatTurn("user", text)])


def generate(
    runner: ModelRunner,
    prompt: list[int],
    n: int = NEW_TOKENS,
    params: SamplingParams = SamplingParams(),
    resume: list[int] | None = None,
    eos: tuple[int, ...] = (2,),
) -> list[int]:
    """Our generation loop without the engine: prefill, then one token at a time."""
    seq = GenSequence(
        request_id="t",
        prompt_ids=prompt,
        resume_ids=resume or [],
        sampling=params,
        seed=params.seed or 0,
        max_new_tokens=n,
        decode=lambda ids: "",
        eos_ids=eos,
    )
    return runner.generate(seq)


def test_chat_template_matches_transformers(tokenizer: Tokenizer, gguf: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    conversation = [{"role": "user", "content": PROMPTS[0]}]
    expected = hf.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert chat_ids(tokenizer, PROMPTS[0]) == list(expected["input_ids"])


def test_float32_logits_match_reference(runner: ModelRunner, hf_model: Any, tokenizer: Tokenizer) -> None:
    ids = chat_ids(tokenizer, PROMPTS[0])
    with torch.inference_mode():
        reference = hf_model(torch.tensor([ids])).logits[0].float()
    ours = runner.logits(ids, 0)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=LOGIT_ATOL, rtol=0)


def test_safetensors_folder_loads_to_the_same_model(
    runner: ModelRunner, gguf: Path, tokenizer: Tokenizer
) -> None:
    from_folder, weights = ModelRunner.load(reference_folder(gguf), torch.device("cpu"), torch.float32, 512)
    assert weights.args == runner.args
    assert weights.args.context_length == 8192  # from the metadata, like the GGUF's
    assert weights.eos_token_ids == (2,)
    ids = chat_ids(tokenizer, PROMPTS[1])
    torch.testing.assert_close(from_folder.logits(ids, 0), runner.logits(ids, 0), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_float32_greedy_matches_reference(
    prompt: str, runner: ModelRunner, hf_model: Any, tokenizer: Tokenizer
) -> None:
    ids = chat_ids(tokenizer, prompt)
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=2
        )
    expected = out[0, len(ids) :].tolist()
    assert generate(runner, ids) == expected


def test_seeded_resume_continues_the_same_stream(runner: ModelRunner, tokenizer: Tokenizer) -> None:
    """Failover: prompt + the first k sampled tokens, prefilled elsewhere, sample what the original did."""
    ids = chat_ids(tokenizer, "Tell me a story about a dragon.")
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    original = generate(runner, ids, 16, params)
    assert generate(runner, ids, 10, params, resume=original[:6]) == original[6:]


def test_bfloat16_answers_like_float32(
    worker_model_bf16: ModelRunner, runner: ModelRunner, tokenizer: Tokenizer
) -> None:
    ids = chat_ids(tokenizer, PROMPTS[0])
    fp32 = generate(runner, ids, 8)
    bf16 = generate(worker_model_bf16, ids, 8)
    assert tokenizer.decode(bf16[:6]) == tokenizer.decode(fp32[:6])
    assert "Paris" in tokenizer.decode(bf16)


@pytest.fixture(scope="module")
def worker_model_bf16(worker: Any) -> ModelRunner:
    """The session worker's bfloat16 weights, with a KV cache of its own."""
    shared = worker.service.runner
    return ModelRunner(shared.model, shared.device, shared.dtype, max_context=512)

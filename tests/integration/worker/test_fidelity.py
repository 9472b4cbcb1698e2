"""Our model against Hugging Face transformers on the same GGUF weights.

float32: logits agree to 1e-3 absolute (logits are O(10)) and greedy continuations
of chat prompts are identical. The 4-bit path (the GGUF's own Q4_1 groups): within its bounds
teacher-forced, greedy leaves the reference only at near-ties. The default worker's kernels:
the easy answer is still right.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker.model.kernels import Kernel, int4_available
from services.worker.model.loader import packaged_model_path
from services.worker.request import ChatTurn, SamplingParams
from services.worker.runner import KernelChoice, ModelRunner
from services.worker.sequence import GenSequence
from services.worker.tokenizer import Tokenizer
from tests.fixtures.prompts import CAPITAL_ANSWER, CAPITAL_QUESTION
from tests.fixtures.reference_model import CACHE, load_reference, reference_folder

pytestmark = pytest.mark.slow

LOGIT_ATOL = 1e-3
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning' into Spanish and French.",
    "Give me a short recipe for pancakes.",
    "What is 12 times 7? Show your steps.",
    "Describe a cat to someone who has never seen one.",
]
NEW_TOKENS = 32
# The fidelity workload: every prompt, 64 tokens each.
FIDELITY_TOKENS = 64
MAX_RELATIVE_ERROR = 1e-4
# Where transformers' own top two logits are closer than this, float32 rounding may pick either.
NEAR_TIE = 1e-3
# Of the eight greedy continuations, how many may part from transformers' at such a near-tie:
# a near-tie is rare (none in 8 x 64 tokens when this was written), so more than one is a bug.
MAX_DIFFERING_PROMPTS = 1


@pytest.fixture(scope="module")
def gguf() -> Path:
    return packaged_model_path()


@pytest.fixture(scope="module")
def hf_model(gguf: Path) -> Iterator[Any]:
    model = load_reference(gguf, torch.float32)
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


@pytest.fixture(scope="module")
def reference_runs(hf_model: Any, tokenizer: Tokenizer) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """Per prompt: its ids, transformers' greedy 64 tokens, and its logits over prompt + those tokens."""
    runs = []
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        continuation = hf_greedy(hf_model, ids, FIDELITY_TOKENS)
        with torch.inference_mode():
            logits = hf_model(torch.tensor([[*ids, *continuation[:-1]]])).logits[0].float()
        runs.append((ids, continuation, logits))
    return runs


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, end of sequence included like `ignore_eos` does on our side.

    A plain loop over the model with its own cache: `generate` would stop at the end-of-sequence
    token, and `min_new_tokens` would forbid it, changing the argmax where it is the best token.
    """
    out: list[int] = []
    with torch.inference_mode():
        result = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True)
    return out


def test_float32_teacher_forced_logits_match_reference_on_8_prompts_x_64_tokens(
    runner: ModelRunner, reference_runs: list[tuple[list[int], list[int], torch.Tensor]]
) -> None:
    worst = 0.0
    for ids, continuation, reference in reference_runs:
        ours = runner.logits([*ids, *continuation[:-1]], 0)
        assert ours.shape == reference.shape
        # Relative to each position's largest logit: near-zero logits make elementwise ratios meaningless.
        scale = reference.abs().amax(dim=-1, keepdim=True)
        worst = max(worst, ((ours - reference).abs() / scale).max().item())
    print(f"max relative logit error over {len(PROMPTS)} prompts x {FIDELITY_TOKENS} tokens: {worst:.2e}")
    assert worst <= MAX_RELATIVE_ERROR


def test_float32_greedy_through_the_batched_engine_matches_reference(
    runner: ModelRunner, reference_runs: list[tuple[list[int], list[int], torch.Tensor]]
) -> None:
    """All eight prompts decoded together through the paged, batched path, 64 tokens each."""
    from tests.integration.worker.test_batching import GREEDY, drive, make_seq

    arrivals = [
        (0, make_seq(f"p{i}", ids, FIDELITY_TOKENS, GREEDY)) for i, (ids, _, _) in enumerate(reference_runs)
    ]
    outputs, _ = drive(runner, arrivals, num_blocks=256)
    differing, near_ties = 0, 0
    for i, (ids, expected, logits) in enumerate(reference_runs):
        got = outputs[f"p{i}"]
        if got == expected:
            continue
        step = next(k for k, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        top2 = logits[len(ids) - 1 + step].topk(2)
        gap = (top2.values[0] - top2.values[1]).item()
        differing += 1
        near_ties += int(gap < NEAR_TIE)
        # Allowed only at a near-tie of the reference itself, where ours took the reference's
        # runner-up; after it the two continue different texts.
        assert gap < NEAR_TIE, (
            f"prompt {i} differs at step {step} without a near-tie (top two {gap:.2e} apart)"
        )
        assert got[step] == int(top2.indices[1]), f"prompt {i} at step {step}: not the reference's runner-up"
    identical = len(PROMPTS) - differing
    print(
        f"greedy: {identical}/{len(PROMPTS)} identical over {FIDELITY_TOKENS} tokens, {near_ties} near-ties"
    )
    assert differing <= MAX_DIFFERING_PROMPTS, (
        f"{differing} of {len(PROMPTS)} greedy continuations differ from transformers' (at most "
        f"{MAX_DIFFERING_PROMPTS} may, at a near-tie)"
    )


def test_seeded_resume_continues_the_same_stream(runner: ModelRunner, tokenizer: Tokenizer) -> None:
    """Failover: prompt + the first k sampled tokens, prefilled elsewhere, sample what the original did."""
    ids = chat_ids(tokenizer, "Tell me a story about a dragon.")
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    original = generate(runner, ids, 16, params)
    assert generate(runner, ids, 10, params, resume=original[:6]) == original[6:]


def test_the_default_workers_kernels_answer_like_float32(
    worker_kernels: ModelRunner, runner: ModelRunner, tokenizer: Tokenizer
) -> None:
    """The default worker (dtype and weights auto) runs a one-row decode with its small-batch
    kernel (the 4-bit one on CPU); the easy answer is still right."""
    ids = chat_ids(tokenizer, CAPITAL_QUESTION)
    fp32 = generate(runner, ids, 8)
    ours = generate(worker_kernels, ids, 8)
    print(f"default worker kernels: {worker_kernels.plan.describe()}")
    assert tokenizer.decode(ours[:6]) == tokenizer.decode(fp32[:6])
    assert CAPITAL_ANSWER in tokenizer.decode(ours)


# The serving tests assert on this question's answer whichever kernels their worker measured
# fastest: each answer token must lead by more than a bfloat16 step can move it.
ANSWER_TOKENS = 8
ANSWER_MIN_LEAD = 2 * 0.5  # twice BF16_NEAR_TIE (defined with the 4-bit tests below)


def one_kernel_runner(gguf: Path, kernel: Kernel) -> ModelRunner:
    """The model with float32 weights, every projection run by `kernel`."""
    runner, _ = ModelRunner.load(
        gguf,
        torch.device("cpu"),
        torch.float32,
        512,
        KernelChoice((kernel,), max_rows=512, max_sampled_rows=16),
    )
    return runner


@pytest.mark.parametrize("kernel", ["fp32", "bf16", "int4-bf16"])
def test_the_serving_tests_question_has_no_near_tie_under_any_kernel(
    gguf: Path, tokenizer: Tokenizer, kernel: str
) -> None:
    chosen = Kernel.parse(kernel)
    if chosen.weights == "int4" and not int4_available(torch.device("cpu")):
        pytest.skip("torch has no CPU 4-bit kernel")
    runner = one_kernel_runner(gguf, chosen)
    ids = chat_ids(tokenizer, CAPITAL_QUESTION)
    answer = generate(runner, ids, ANSWER_TOKENS)
    logits = runner.logits([*ids, *answer[:-1]], 0)[len(ids) - 1 :]
    top2 = logits.topk(2, dim=-1).values
    leads = (top2[:, 0] - top2[:, 1]).tolist()
    text = tokenizer.decode(answer)
    assert CAPITAL_ANSWER in text, text
    # Up to the answer word: what follows it is not asserted on.
    upto = next(i for i in range(len(answer)) if CAPITAL_ANSWER in tokenizer.decode(answer[: i + 1])) + 1
    print(f"{kernel}: {text!r}, smallest lead up to the answer {min(leads[:upto]):.2f}")
    assert min(leads[:upto]) > ANSWER_MIN_LEAD, leads


@pytest.fixture(scope="module")
def worker_kernels(worker: Any) -> ModelRunner:
    """The session worker's weights and kernel plan, with a KV cache of its own."""
    shared = worker.service.runner
    return ModelRunner(shared.model, shared.device, shared.dtype, max_context=512, plan=shared.plan)


# --- the 4-bit path: the GGUF's own Q4_1 groups through torch's 4-bit kernel ---------------------

# With float32 activations the 4-bit weights are the dequantised ones exactly (only summation order
# differs). With bfloat16 ones torch's kernel also holds each group's scale and zero in bfloat16,
# about 3e-3 of a product's size per matmul on its own (tests/unit/worker/test_kernels.py); dense
# bfloat16 matmuls with the same float32 residual stream reach about 2e-2 over this workload, the
# 4-bit path about 4e-2. The bound sits just above what the kernel can give, so a packing error
# (a wrong zero point, a row order) fails it by orders of magnitude.
INT4_MAX_RELATIVE_ERROR = {torch.float32: 1e-3, torch.bfloat16: 6e-2}
# bfloat16 logits move by up to ~1e-2 of the largest (about 0.3 here): a greedy choice between
# two tokens closer than this in transformers' float32 logits may go either way.
BF16_NEAR_TIE = 0.5
# Of the 8 x 64 teacher-forced positions, at most this many may pick another greedy token than
# transformers (each at a near-tie). Free-running greedy text parts from the reference at its
# first such flip and is different text from then on, so the engine run below only checks that
# each prompt leaves at a near-tie.
INT4_MAX_ARGMAX_FLIPS = 20

needs_int4 = pytest.mark.skipif(not int4_available(torch.device("cpu")), reason="no CPU 4-bit kernel")


def int4_runner(gguf: Path, dtype: torch.dtype) -> ModelRunner:
    kernel = Kernel("int4", dtype)
    runner = one_kernel_runner(gguf, kernel)
    assert runner.plan.kernels == (kernel,)
    # Every layer's projections run the shipped 4-bit groups (the vocabulary projection runs
    # in the model's dtype: tests/unit/worker/test_kernels.py).
    assert runner.model.layers[0].mlp.down_proj.uses(kernel) == "int4"
    return runner


@pytest.fixture(scope="module")
def int4(gguf: Path) -> Iterator[ModelRunner]:
    """The 4-bit path as a worker runs it here: the shipped groups with bfloat16 activations."""
    if not int4_available(torch.device("cpu")):
        pytest.skip("torch has no CPU 4-bit kernel")
    runner = int4_runner(gguf, torch.bfloat16)
    yield runner
    del runner


def max_relative_error(runner: ModelRunner, runs: list[tuple[list[int], list[int], torch.Tensor]]) -> float:
    worst = 0.0
    for ids, continuation, reference in runs:
        ours = runner.logits([*ids, *continuation[:-1]], 0)
        scale = reference.abs().amax(dim=-1, keepdim=True)
        worst = max(worst, ((ours - reference).abs() / scale).max().item())
    return worst


def test_int4_teacher_forced_logits_match_reference(
    int4: ModelRunner, reference_runs: list[tuple[list[int], list[int], torch.Tensor]]
) -> None:
    worst = max_relative_error(int4, reference_runs)
    print(f"int4-bf16: max relative logit error over {len(PROMPTS)} x {FIDELITY_TOKENS}: {worst:.2e}")
    assert worst <= INT4_MAX_RELATIVE_ERROR[torch.bfloat16]
    flips = []
    for ids, continuation, reference in reference_runs:
        ours = int4.logits([*ids, *continuation[:-1]], 0)[len(ids) - 1 :]
        want = reference[len(ids) - 1 :]
        for got, expected in zip(ours, want, strict=True):
            if int(got.argmax()) != int(expected.argmax()):
                top2 = expected.topk(2).values
                flips.append((top2[0] - top2[1]).item())
    print(f"int4-bf16: greedy token differs at {len(flips)} of {len(PROMPTS) * FIDELITY_TOKENS} positions")
    assert all(gap < BF16_NEAR_TIE for gap in flips), f"a flip without a near-tie: gaps {flips}"
    assert len(flips) <= INT4_MAX_ARGMAX_FLIPS


@needs_int4
def test_int4_with_float32_activations_is_the_dequantised_model(
    gguf: Path, reference_runs: list[tuple[list[int], list[int], torch.Tensor]]
) -> None:
    """torch's 4-bit CPU kernel with float32 activations is its slow reference path (the plan
    never picks it on CPU): one prompt x 64 tokens keeps the suite's time."""
    runner = int4_runner(gguf, torch.float32)
    worst = max_relative_error(runner, reference_runs[:1])
    print(f"int4-fp32: max relative logit error over 1 x {FIDELITY_TOKENS}: {worst:.2e}")
    assert worst <= INT4_MAX_RELATIVE_ERROR[torch.float32]


def test_int4_greedy_through_the_batched_engine_leaves_the_reference_only_at_near_ties(
    int4: ModelRunner, reference_runs: list[tuple[list[int], list[int], torch.Tensor]]
) -> None:
    from tests.integration.worker.test_batching import GREEDY, drive, make_seq

    (kernel,) = int4.plan.kernels
    near_tie = BF16_NEAR_TIE
    arrivals = [
        (0, make_seq(f"p{i}", ids, FIDELITY_TOKENS, GREEDY)) for i, (ids, _, _) in enumerate(reference_runs)
    ]
    outputs, _ = drive(int4, arrivals, num_blocks=256)
    diverging = 0
    for i, (ids, expected, logits) in enumerate(reference_runs):
        got = outputs[f"p{i}"]
        if got == expected:
            continue
        step = next(k for k, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        top2 = logits[len(ids) - 1 + step].topk(2).values
        gap = (top2[0] - top2[1]).item()
        assert gap < near_tie, f"{kernel.name}: prompt {i} leaves at step {step}, gap {gap:.3f}: no near-tie"
        diverging += 1
    print(f"{kernel.name} greedy: {len(PROMPTS) - diverging}/{len(PROMPTS)} identical over {FIDELITY_TOKENS}")


@needs_int4
def test_int4_bf16_alone_and_in_a_batch_of_16(int4: ModelRunner, tokenizer: Tokenizer) -> None:
    """bfloat16 sums in a different order inside a batch, so tokens may differ after a near-tie:
    print the share that match (the issue asks for it); the float32 path asserts identity."""
    from tests.integration.worker.test_batching import (
        GREEDY,
        NUM_BLOCKS,
        TARGET_TOKENS,
        drive,
        make_seq,
        mixed_requests,
    )

    runner = int4
    matched = 0
    for prompt in PROMPTS[:4]:
        target = chat_ids(tokenizer, prompt)
        alone, _ = drive(runner, [(0, make_seq("target", target, TARGET_TOKENS, GREEDY))], NUM_BLOCKS)
        arrivals = [(2, make_seq("target", target, TARGET_TOKENS, GREEDY)), *mixed_requests(target)]
        batched, _ = drive(runner, arrivals, NUM_BLOCKS)
        matched += sum(a == b for a, b in zip(alone["target"], batched["target"], strict=True))
        assert len(batched["target"]) == TARGET_TOKENS
    share = matched / (4 * TARGET_TOKENS)
    print(f"int4-bf16 alone vs batched: {share:.0%} of tokens match")
    assert share > 0.5

"""bfloat16 follows the reference's precision rules: our DiT and VAE on the reference's own bf16
inputs give the reference's bf16 outputs (recorded in ``tests/fixtures/bf16-reference``).

The records were made on an AVX-512 CPU, where torch runs bf16 matmuls and convolutions through
oneDNN's bf16 kernels; on such a machine ours are bit-identical, and the tight bounds leave room
for a few bf16 steps but not for a different rule (normalising the VAE's RMS norms in float32, as
diffusers 0.38+ does, moves the decoded pixels by a mean of 3.5e-3).

On a CPU without AVX-512 (AVX2 only) oneDNN declines bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
is False) and torch's own kernels run instead; their reductions (the norms, softmax, layer norm) add
float32 partial sums over 8 lanes instead of 16, so a norm that lands near a bf16 rounding boundary
can round to the neighbouring value, which rescales a whole vector by one bf16 step (0.4%). Through
the layers that reaches 40–80% of the outputs: measured on an AMD EPYC (AVX2), DiT mean 3.6e-3 (max
0.047), VAE mean 3.0e-3 (max 0.023) on ``t2i_system_prompt``. That is as large as the rule
difference, so there the bounds are the kernel bounds below, and the rule itself is checked on the
same machine (same kernels on both sides), where only the rule differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import diffusers
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file

from internvl_u_core.pipeline import load_generation_decoder, load_vae
from internvl_u_core.sampling import LatentCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from reference_compare import recorded_dit_inputs  # noqa: E402  (the script that recorded the fixtures)

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "internvlu-tiny-c" / "checkpoint"
CASES = ("t2i_system_prompt", "edit_image_slot_mid")
CPU = torch.device("cpu")
#: Whether bf16 runs through the kernels the records were made with (oneDNN bf16, AVX-512 CPUs).
RECORDED_KERNELS = torch.ops.mkldnn._is_mkldnn_bf16_supported()
# (mean, worst) absolute error against the records. Recorded kernels: a few bf16 steps (observed 0, 0).
# Other kernels (AVX2): 2-3x what an AVX2 EPYC showed (DiT 3.6e-3/0.047, VAE 3.0e-3/0.023); float32
# compute in the DiT, a different rule, lands 0.19-0.25 away (20x the DiT bound); the VAE's rule is
# checked on the same machine below.
DIT_BOUND = (1e-3, 0.0625) if RECORDED_KERNELS else (1e-2, 0.0625)
VAE_BOUND = (5e-4, 0.0157) if RECORDED_KERNELS else (6e-3, 0.047)


def _record(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "bf16-reference" / f"{case}.safetensors"))


def _error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.bfloat16
    err = (actual.float() - expected.float()).abs()
    return err.mean().item(), err.max().item()


def _decode(vae, record: dict) -> torch.Tensor:
    """What ``LatentCodec.decode`` does after de-normalising the latents."""
    with torch.no_grad():
        return LatentCodec(vae).frames.decode(record["decode_in"].unsqueeze(2))


@pytest.mark.parametrize("case", CASES)
def test_dit_matches_the_reference_bf16_run(case):
    record = _record(case)
    decoder = load_generation_decoder(CHECKPOINT / "generation_decoder", torch.bfloat16, CPU)
    with torch.no_grad():
        out = decoder.decoder(**recorded_dit_inputs(record))
    mean, worst = _error(out, record["dit_out"])
    assert mean <= DIT_BOUND[0] and worst <= DIT_BOUND[1], (mean, worst)


@pytest.mark.parametrize("case", CASES)
def test_vae_decode_matches_the_reference_bf16_run(case):
    record = _record(case)
    vae = load_vae(CHECKPOINT / "vae", torch.bfloat16, CPU)
    mean, worst = _error(_decode(vae, record), record["decoded"])
    assert mean <= VAE_BOUND[0] and worst <= VAE_BOUND[1], (mean, worst)


@pytest.mark.skipif(Version(diffusers.__version__) < Version("0.38"), reason="diffusers < 0.38 has the reference's rule")
def test_diffusers_own_vae_norm_rule_is_outside_the_bound():
    """Without our norm rule, a newer diffusers' VAE misses the bound: the test above can fail."""
    from diffusers import AutoencoderKLQwenImage

    record = _record("t2i_system_prompt")
    vae = AutoencoderKLQwenImage.from_pretrained(str(CHECKPOINT / "vae"), torch_dtype=torch.bfloat16).eval()
    mean, _ = _error(_decode(vae, record), record["decoded"])
    assert mean > VAE_BOUND[0] or not RECORDED_KERNELS, mean  # observed: 3.5e-3 (AVX-512 and AVX2)


@pytest.mark.skipif(Version(diffusers.__version__) < Version("0.38"), reason="diffusers < 0.38 has the reference's rule")
@pytest.mark.parametrize("case", CASES)
def test_our_vae_norm_rule_is_the_references_on_this_machines_kernels(case):
    """The rule, free of kernel differences: both VAEs run here; only their RMS-norm rule differs.

    Ours must stay nearer the record than diffusers' float32 rule, and the two must differ by
    the rule's size (3.4e-3-3.6e-3 measured on AVX-512 and AVX2; kernel noise between two runs
    here is zero).
    """
    from diffusers import AutoencoderKLQwenImage

    record = _record(case)
    ours = _decode(load_vae(CHECKPOINT / "vae", torch.bfloat16, CPU), record)
    theirs = _decode(
        AutoencoderKLQwenImage.from_pretrained(str(CHECKPOINT / "vae"), torch_dtype=torch.bfloat16).eval(), record
    )
    rule_gap, _ = _error(ours, theirs)
    ours_off, theirs_off = _error(ours, record["decoded"])[0], _error(theirs, record["decoded"])[0]
    assert rule_gap > 2e-3, rule_gap
    assert ours_off < theirs_off, (ours_off, theirs_off)

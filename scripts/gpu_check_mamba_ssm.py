"""On a CUDA machine with mamba-ssm installed: our model's logits vs mamba-ssm's MambaLMHeadModel for
random-init models of both families (the same weights), and our scan with vs without mamba-ssm's
kernels. Prints one line per check; exits non-zero when a check fails.

    python scripts/gpu_check_mamba_ssm.py
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> int:
    from mamba_ssm.models.config_mamba import MambaConfig as RefConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as RefModel

    from mqtool.checkpoint import build_model
    from mqtool.models import MambaConfig, scan

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failed = False
    for layer, ssm_cfg in (("Mamba1", {}), ("Mamba2", {"layer": "Mamba2", "d_state": 128, "headdim": 64})):
        cfg = {"d_model": 512, "n_layer": 4, "vocab_size": 50277, "ssm_cfg": ssm_cfg, "rms_norm": True,
               "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16}
        torch.manual_seed(0)
        ref = RefModel(RefConfig(**cfg), device="cuda", dtype=torch.float32).eval()
        with torch.no_grad():  # mamba-ssm inits norms to 1, D to 1: perturb so every parameter matters
            for name, p in ref.named_parameters():
                if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                    p.add_(0.2 * torch.randn_like(p))
        state = {k: v for k, v in ref.state_dict().items()}
        ours = build_model(MambaConfig.from_dict(cfg), state, torch.float32, "cuda")
        ids = torch.randint(0, 50277, (2, 1000), device="cuda")
        with torch.no_grad():
            ref_logits = ref(ids).logits.float()
            for label, env in (("with mamba-ssm kernels", None), ("plain PyTorch scan", "1")):
                if env:
                    os.environ["MQTOOL_NO_MAMBA_SSM"] = env
                else:
                    os.environ.pop("MQTOOL_NO_MAMBA_SSM", None)
                scan.mamba_ssm_ops.cache_clear()
                logits = ours(ids).float()
                err = (logits - ref_logits).abs().max().item()
                rel = err / ref_logits.abs().max().item()
                ok = rel < 1e-3
                failed |= not ok
                print(f"{layer}: ours ({label}) vs mamba-ssm MambaLMHeadModel logits: max abs diff {err:.3e}, "
                      f"relative {rel:.3e}, scale {ref_logits.abs().max().item():.2f} -> {'OK' if ok else 'FAIL'}")
            os.environ.pop("MQTOOL_NO_MAMBA_SSM", None)
            scan.mamba_ssm_ops.cache_clear()
            rec = ours(ids[:, :200], mode="recurrent").float()
            par = ours(ids[:, :200]).float()
            err = (rec - par).abs().max().item() / par.abs().max().item()
            failed |= err > 1e-3
            print(f"{layer}: recurrent vs parallel (200 tokens): relative {err:.3e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

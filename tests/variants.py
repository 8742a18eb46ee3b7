"""The CBAM variants every correctness test runs over (DESIGN.md section 2 and the paper's
ablations), as cbam_fused.CBAM keyword arguments."""
import cbam_fused

VARIANTS = {
    "official": dict(),
    "official_avg": dict(pool_types=["avg"]),
    "official_max": dict(pool_types=["max"]),
    "channel_only": dict(no_spatial=True),
    "spatial_only": dict(no_channel=True),
    "timm": dict(spatial_pools="mean,max", mlp_bias=False),
    "timm_light": dict(pool_types=["blend"], spatial_pools="blend", mlp_bias=False),
    "ultralytics": dict(pool_types=["avg"], channel_head="single", spatial_pools="mean,max",
                        spatial_norm=None, kernel_size=3),
    "k3_conv_bias_no_norm": dict(kernel_size=3, conv_bias=True, spatial_norm=None),
    "k5_silu": dict(kernel_size=5, act="silu"),
    "gelu_no_bias": dict(act="gelu", mlp_bias=False),
    "spatial_first": dict(arrangement="spatial_first"),
    "spatial_first_max": dict(arrangement="spatial_first", pool_types=["max"]),
    "parallel": dict(arrangement="parallel"),
    "parallel_no_norm": dict(arrangement="parallel", spatial_norm=None),
    # the official code's lp and lse pools (its ChannelGate pool_types)
    "official_lp_lse": dict(pool_types=["avg", "max", "lp", "lse"]),
    "parallel_lse": dict(arrangement="parallel", pool_types=["lse"]),
    "spatial_first_lp_lse": dict(arrangement="spatial_first", pool_types=["lse", "avg", "lp"]),
    "channel_only_lp": dict(no_spatial=True, pool_types=["lp", "avg"]),
}

# Variants whose spatial gate has a BatchNorm (train and eval differ).
HAS_BN = {k for k, v in VARIANTS.items()
          if not v.get("no_spatial") and v.get("spatial_norm", "batchnorm") is not None}


def make(variant: str, channels: int, dim: int = 2, hidden: int = 4) -> cbam_fused.CBAM:
    kw = dict(VARIANTS[variant])
    kw.setdefault("hidden_channels", hidden)
    return cbam_fused.CBAM(channels, 16, kw.pop("pool_types", ["avg", "max"]),
                           kw.pop("no_spatial", False), dim=dim, **kw)

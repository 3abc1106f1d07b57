"""The DiT sizes of Peebles & Xie (2023), Table 1, without torch: the spec's presets and model/dit.py's
named configs both read them. A name "DiT-XL/2" adds the patch size."""

DIT_SIZES: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}
PATCH_SIZES = (2, 4, 8)
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {**dims, "patch_size": patch} for size, dims in DIT_SIZES.items() for patch in PATCH_SIZES
}

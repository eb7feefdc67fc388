"""Running precomputed models in mlx-lm (`pip install 'firstlayer[mlx]'`).

A folder written by `firstlayer convert` carries a one-line module (`folder.MLX_MODEL_FILE`)
that its config names as `model_file`; mlx-lm imports it when given trust_remote_code
(`mlx_lm.generate --model OUT --trust-remote-code`), and it imports `firstlayer.mlx.models`,
which builds mlx-lm's own model class of the family and replaces layer 0's token-local part.
Nothing here is imported until mlx-lm loads such a folder.
"""

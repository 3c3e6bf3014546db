"""Names and limits the package offers, without importing torch: the command-line parser
offers them as choices, and the modules that implement them import them from here, so the
two cannot drift apart."""

# Backbone names, in the order `--help` lists them (models.backbones.BACKBONES builds them).
BACKBONE_NAMES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
# Largest image_size / center_crop side: the fit state is (side / 4)^2 patches x C^2 float64,
# 5 GB at 1024 px with 100 channels; beyond that a typo (100000) would ask for terabytes.
MAX_IMAGE_SIZE = 1024
# Longest side of a heatmap overlay (`score`'s files, `serve`'s answers): images beyond it
# get a downscaled overlay (a 10000 px overlay at full size would need gigabytes for no
# visible gain).
HEATMAP_MAX_SIDE = 2048
# ONNX export: input pixel types, and how the precision factors are stored.
ONNX_INPUT_DTYPES = ("float32", "uint8")
ONNX_FACTOR_STORAGE = ("packed", "dense")
# Storage of the precision factor the distances read (PaDiM factor_dtype, score --factor-dtype).
FACTOR_DTYPES = ("float32", "bfloat16")

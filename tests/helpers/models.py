"""The tiny random UNet the fast tests train and save (8x8, 1 channel, about 30k parameters)."""
from diffusers import UNet2DModel


def tiny_unet(class_conditional: bool = True, null: bool = True) -> UNet2DModel:
    """A random tiny ``UNet2DModel``; class-conditional with 10 classes (+ the null class 10 when ``null``, which
    ESD and CFG need), or unconditional. Seed torch before calling it for fixed weights."""
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=(11 if null else 10) if class_conditional else None)
    if class_conditional and null:
        unet.register_to_config(fastunlearn_null_class=10)
    return unet

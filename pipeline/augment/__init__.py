"""The training augmentations, one object per file; `recipe.py` lists them in the order they run.

    recipe.py           Augment: the settings, the list of ops, each sample's random draw
    op.py               Op: what an augmentation provides (its draw, DALI step, CPU step)
    scale_crop_flip.py  a random source window, resized to the crop's scale, mirrored
    pad.py              bottom/right up to the crop
    colour.py           brightness, contrast, saturation and hue, as one matrix per sample
"""

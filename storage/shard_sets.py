"""The names of the shard sets stages hand each other (``<set>-<split>-NNNNNN.tar``): download writes
low-res and high-res crops, upscale writes the upscaled low-res ones, prepare reads what is there.
One owner for the three names, in a module light enough for any stage to import first."""

LOWRES = "lowres"  # small crops (CIFAR-10's 32x32, or photos shrunk), for the upscale stage
HIGHRES = "highres"  # crops at the training size's scale, straight to prepare
UPSCALED = "upscaled"  # the low-res crops after Real-ESRGAN (or bicubic) x4

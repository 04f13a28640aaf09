"""The mini Stable Diffusion of the offline profile, rebuilt for 128 px radiographs (issue #27 item 2).

One concept a file:

- :mod:`~selora.minisd.shapes` -- the captioned shapes domain (and generic images for the VAE);
- :mod:`~selora.minisd.views` -- captioned radiographs of other views (lateral, oblique) rendered
  from the same chest CT as the stand-in scans: radiograph texture, but never a frontal chest view
  and none of the findings vocabulary, so fine-tuning on the stand-in scans is still a domain shift;
- :mod:`~selora.minisd.architecture` -- SD v1.5's module types at toy size (x8 VAE, 16x16x4 latents);
- :mod:`~selora.minisd.judge` -- a classifier of every prompt attribute, to judge samples (not by eye);
- :mod:`~selora.minisd.stages` -- the training stages, each resumable from its own snapshot;
- :mod:`~selora.minisd.build` -- the command line that runs them and writes the pipeline folder.
"""

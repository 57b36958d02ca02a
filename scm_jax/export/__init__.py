"""Portable generators: a trained sampler serialized with jax.export.

    python -m scm_jax.export --workdir=W --steps=2 --platforms=cpu,cuda,tpu --out=gen.jaxexport

    from scm_jax.export import load        # jax + numpy only, no model code
    gen = load('gen.jaxexport')
    x = gen(gen.noise(batch=16), labels=np.arange(16) % 10)

`artifact` (the format and the loader) imports only jax and numpy and works as a file
on its own; `build` (the exporter) needs the rest of scm_jax.
"""

from scm_jax.export.artifact import ArtifactError, Generator, load

__all__ = ['ArtifactError', 'Generator', 'load']

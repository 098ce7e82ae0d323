"""Each stage's settings section, one module per stage (``tasks.settings.<stage>: Settings``), kept apart
from the stage's code so that reading or validating a setting imports no torch: ``flows.config``
composes these, and the stage module (``tasks.<stage>``) takes its own as ``Settings``."""

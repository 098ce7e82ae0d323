"""Networks and numerics: Lab conversion, the colorizer, Real-ESRGAN loading, metrics."""

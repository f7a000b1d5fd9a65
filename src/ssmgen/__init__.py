"""ssmgen: train a raw-waveform SaShiMi model on your own audio and continue any song with it."""

__version__ = "0.1.0"

"""The token alphabet, shared by the codecs, the datasets, the model, sampling and export: 8-bit
codes, so 256 tokens, and the token both codecs give to silence (0.0 encodes to it and it decodes
to exactly 0.0). The first input of every sequence, and of a generation from nothing, is silence.

Nothing else lives here, so that any module can import it without pulling in a dependency.
"""

N_TOKENS = 256
SILENCE_TOKEN = 128

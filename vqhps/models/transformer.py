"""The pre-norm transformer encoder/decoder pair shared by VQ-HPS and the FastMETRO-style baseline."""
from __future__ import annotations

from torch import nn


def encoder_decoder(d_model: int, n_heads: int, mlp_hidden: int, dropout: float, enc_layers: int,
                    dec_layers: int) -> tuple[nn.TransformerEncoder, nn.TransformerDecoder]:
    """Encoder over image tokens and decoder over learned queries (pre-norm, GELU, batch first)."""
    enc_layer = nn.TransformerEncoderLayer(d_model, n_heads, mlp_hidden, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(enc_layer, enc_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
    dec_layer = nn.TransformerDecoderLayer(d_model, n_heads, mlp_hidden, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
    decoder = nn.TransformerDecoder(dec_layer, dec_layers, norm=nn.LayerNorm(d_model))
    return encoder, decoder

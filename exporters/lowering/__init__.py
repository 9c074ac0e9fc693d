"""The decoder graph's op families, each in its forms side by side (portable, fused, static).

``variant_spec.VariantSpec`` says which form of each family a graph variant uses (``spec`` makes
one per variant, checked); ``exporters/decoder.py`` walks the layout and asks these modules:
``norm``, ``rotary``, ``attention``, ``linear`` (one matmul in its stored form; q/k/v and gate/up),
``head`` (positions, final norm, lm_head). Each function takes the ``context.LoweringContext`` of
the graph being built.
"""

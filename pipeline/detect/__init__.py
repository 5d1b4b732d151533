"""The SSD detection track: banana-layout data, anchors, matching, TinySSD / timm SSD, NMS, mAP.

Stages: ``python -m pipeline.detect.train``, ``.predict`` and ``.evaluate`` (default config
``configs/banana_ssd.yaml``, the embedded shapes-on-photographs set built on first use).
"""

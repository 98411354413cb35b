"""The data of the two model families, apart:

- :mod:`pact_ray.data.objects`: the PAct articulated objects (Stage1 and Stage2): the
  on-disk format, the synthetic generator, the stand-in encoders, the loader and the
  24-number articulation vectors;
- :mod:`pact_ray.data.arm`: the robot arm of the world model: its joints and motor strip,
  LeRobot-style folders, the synthetic episodes and the model's samples;
- :mod:`pact_ray.data.cache`: the node-local cache both families' generated data sets share.
"""

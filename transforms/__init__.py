"""beamsift's Beam transforms and DoFns, one concern a module."""

from beamsift.transforms.io.s3_clients import share_s3_clients

share_s3_clients()

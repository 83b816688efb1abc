"""beamsift's Beam transforms and DoFns, one concern a module."""

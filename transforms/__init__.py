"""beamsift's Beam transforms and DoFns, one concern a module."""

from beamsift.transforms.arrow_memory import use_system_allocator
from beamsift.transforms.io.s3_clients import share_s3_clients
from beamsift.transforms.output_buffers import release_finished_output_buffers
from beamsift.transforms.state_sampling import shorten_state_sampling

use_system_allocator()
share_s3_clients()
shorten_state_sampling()
release_finished_output_buffers()

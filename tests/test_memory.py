"""What the train step keeps in memory: the fast lowerings' step holds fewer activations than
the layer table's, and updates the donated weights in place instead of copying them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from google.protobuf import text_format

import nincc
from nincc import caffe_pb2
from nincc.solver import SolverConfig
from nincc.train import Trainer

N, C, HW = 4, 64, 64
ACTIVATION = N * C * HW * HW * 4  # bytes of one (N, C, H, W) float32 blob

NET = f"""
name: "mem"
layer {{ name: "data" type: "Input" top: "data"
        input_param {{ shape {{ dim: {N} dim: 8 dim: {HW} dim: {HW} }} }} }}
layer {{ name: "target" type: "Input" top: "target"
        input_param {{ shape {{ dim: {N} dim: {C} dim: {HW} dim: {HW} }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param {{ num_output: {C} kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param {{ num_output: {C} kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "cccp" type: "Convolution" bottom: "conv2" top: "cccp"
        convolution_param {{ num_output: {C} kernel_size: 1 }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "cccp" top: "cccp" }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "cccp" bottom: "target" top: "loss" }}
"""


def compiled_step(fast: bool):
    graph = nincc.build_graph(text_format.Parse(NET, caffe_pb2.NetParameter()), phase="TRAIN")
    net = nincc.compile(graph, fast=fast)
    params = net.init(0)
    trainer = Trainer(net, SolverConfig(type="SGD", base_lr=0.01, momentum=0.9))
    state = trainer.init(params)
    feeds = ({
        "data": jnp.zeros((N, 8, HW, HW), jnp.float32),
        "target": jnp.zeros((N, C, HW, HW), jnp.float32),
    },)
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    return trainer._step.lower(params, state, feeds, keys).compile()


def test_fast_step_keeps_two_fewer_activations_than_the_table():
    """Each ReLU keeps a bit mask, not its bottom as well as its top: the table's lowering
    (the reference) keeps about three more activations here."""
    fast = compiled_step(True).memory_analysis().temp_size_in_bytes
    plain = compiled_step(False).memory_analysis().temp_size_in_bytes
    assert fast <= plain - 2 * ACTIVATION, (fast / ACTIVATION, plain / ACTIVATION)


def test_fast_step_updates_the_weights_in_place():
    """No donated weight is copied: each layer's update waits for its own input gradient.
    (The last layer's bias may be: the loss value, an output of the step, repeats its add.)"""
    entry = compiled_step(True).as_text().split("ENTRY", 1)[1]
    weights = set(re.findall(r"%(params\S*___0_\S*) = f32\[", entry))
    assert len(weights) == 3, f"the step's parameters are not named as expected: {weights}"
    copied = {w for w in weights if re.search(rf"copy\(%{re.escape(w)}\)", entry)}
    assert not copied, sorted(copied)

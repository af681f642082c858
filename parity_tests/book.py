"""What the book's chapter-4 seed prints, to be reproduced by both twins."""

import numpy as np

TEXTS = ("Every effort moves you", "Every day holds a")
TOKEN_IDS = np.array([[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]], dtype=np.int64)
SEED = 123

# The printed corners of DummyGPTModel(GPT_CONFIG_124M)(TOKEN_IDS) after torch.manual_seed(123),
# in training mode (the seed never calls eval()): vocabulary columns 0, 1, 2, -3, -2, -1.
CORNER_COLUMNS = [0, 1, 2, -3, -2, -1]
DUMMY_LOGITS_CORNERS = np.array(
    [
        [
            [-1.2034, 0.3201, -0.7130, -1.5548, -0.2390, -0.4667],
            [-0.1192, 0.4539, -0.4432, 0.2392, 1.3469, 1.2430],
            [0.5307, 1.6720, -0.4695, 1.1966, 0.0111, 0.5835],
            [0.0139, 1.6754, -0.3388, 1.1586, -0.0435, -1.0400],
        ],
        [
            [-1.0908, 0.1798, -0.9484, -1.6047, 0.2439, -0.4530],
            [-0.7860, 0.5581, -0.0610, 0.4835, -0.0077, 1.6621],
            [0.3567, 1.2698, -0.6398, -0.0162, -0.1296, 0.3717],
            [-0.2407, -0.7349, -0.5102, 2.0057, -0.3694, 0.1814],
        ],
    ]
)

# §4.7: GPTModel(GPT_CONFIG_124M) after torch.manual_seed(123), eval(), generate_text_simple on
# "Hello, I am" with max_new_tokens=6 prints these ids ("Hello, I am Featureiman Byeswickattribute argue").
GENERATE_PROMPT = "Hello, I am"
GENERATE_IDS = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]

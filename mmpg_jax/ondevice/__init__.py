"""What runs on (or is charged to) the device: on-device fine-tuning and the EM label prior
(device), the AnchorFrame Distribution Reasoner that picks the anchors (adr), and the device's
cost of any method from XLA's cost and memory analyses (costs)."""

"""Model surgery: loading sources, layer plans, init maps, distillation and export."""

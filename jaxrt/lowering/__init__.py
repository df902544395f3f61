"""IR -> JAX. `registry` keys lowering rules by (backend, OpDef); `xla/` has a rule for
every op; `compile` turns a function into a jitted JAX function; `executable` holds
`StepExecutable` (a model's @step with weights and KV cache on device) and
`greedy_generate`. Import the submodules: importing this package loads no jax."""

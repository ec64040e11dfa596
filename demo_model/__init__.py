"""The embedded default's own task and training: the tile task (task: images, questions, accuracy) and the
recipe that trains the small checkpoint that `nvlm-build demo-checkpoint` writes (train). The compiler uses the
task for its task-accuracy report; nothing here imports the compiler."""

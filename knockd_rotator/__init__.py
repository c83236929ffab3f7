"""knockd-rotator as a package: engines that enforce the doors."""

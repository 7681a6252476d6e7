package service

// NewTestService is newTestService for the external test package.
var NewTestService = newTestService

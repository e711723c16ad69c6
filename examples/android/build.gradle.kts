// app/build.gradle.kts: the app module's build file, to merge into a new Android Studio
// project ("Empty Activity"; replace its Compose setup with this). NOT BUILT HERE.
// Repositories: settings.gradle.kts needs google() and mavenCentral() (the template has both).

plugins {
    id("com.android.application")
    // litertlm-android is compiled with a current Kotlin: use Kotlin 2.4 or newer (an older
    // compiler stops with "The actual metadata version is 2.4.0 ... can read versions up to ...").
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.gemmaedge.sample"
    compileSdk = 35

    defaultConfig {
        applicationId = "dev.gemmaedge.sample"
        minSdk = 24 // what the litertlm-android AAR declares
        targetSdk = 35
        versionCode = 1
        versionName = "0.1"
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    // Google's LiteRT-LM Kotlin API from Google Maven (Engine, EngineConfig, Conversation).
    // 0.18.0 matches the litert-lm 0.18.x Python packages gemma-edge's tests run the packed file with.
    implementation("com.google.ai.edge.litertlm:litertlm-android:0.18.0")
    implementation("androidx.activity:activity-ktx:1.9.3") // ComponentActivity
    implementation("androidx.lifecycle:lifecycle-runtime-ktx:2.8.7") // lifecycleScope
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.10.2") // Dispatchers.Main
}
